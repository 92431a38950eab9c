"""Helpers shared by the engine tests: build an engine on a small model, the matching reference config,
and relative-error comparisons of state dicts."""

from fedsim.engine import Federation, build_engine
from fedsim.reference import ReferenceConfig
from methods import make_method


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def make_engine(make_model, data, parts_per_fed, *, seeds, optimizer, targets, fraction, K=3, b=4, rank=4,
                 alpha=8.0, method="fedavg_lora", dp=None, sigmas=None, chunk=None, lrs=None, alphas=None, clips=None,
                 precision="fp32", packed_tokens=True, server=None, server_lrs=None):
    """One engine over len(seeds) federations; lrs / alphas / sigmas / clips (DP clip norms) give each
    federation its own value (server_lrs: the server optimizer's; server: its config section).
    packed_tokens=False: the padded forward even where a packed one exists."""
    method = make_method(method if isinstance(method, dict) else {"name": method},   # a name or {name, params}
                         {"rank": rank, "alpha": alpha, "targets": targets})
    feds = [Federation(seed=s, lr=(lrs or [optimizer["lr"]] * len(seeds))[i],
                       lora_alpha=(alphas or [alpha] * len(seeds))[i],
                       noise_multiplier=(sigmas or [0.0] * len(seeds))[i], partitions=p,
                       max_grad_norm=(clips or [None] * len(seeds))[i], server_lr=(server_lrs or [1.0] * len(seeds))[i])
            for i, (s, p) in enumerate(zip(seeds, parts_per_fed))]
    return build_engine(method, make_model(), data, feds, local_steps=K, batch_size=b, client_fraction=fraction,
                        optimizer=optimizer, dp=dp, replica_chunk=chunk, precision=precision,
                        packed_tokens=packed_tokens, server=server)


def reference_cfg(optimizer, targets, fraction, seed=0, K=3, b=4, rank=4, alpha=8.0, rounds=2, **kw):
    return ReferenceConfig(rounds=rounds, local_steps=K, batch_size=b, lr=optimizer["lr"], optimizer=optimizer["name"],
                           momentum=optimizer.get("momentum", 0.0), weight_decay=optimizer.get("weight_decay", 0.0),
                           eps=optimizer.get("eps", 1e-8),
                           client_fraction=fraction, seed=seed, lora_r=rank, lora_alpha=alpha,
                           target_modules=targets if isinstance(targets, str) else tuple(targets), **kw)


def assert_same(engine_state, ref_state, tol=1e-5):
    assert set(engine_state) <= set(ref_state)
    errs = {n: rel_err(engine_state[n], ref_state[n]) for n in engine_state}
    worst = max(errs, key=errs.get)
    assert errs[worst] < tol, f"{worst}: relative error {errs[worst]:.2e}"
