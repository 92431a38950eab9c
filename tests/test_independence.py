"""A federation's result never depends on the pass it shares.

Any federation of a multi-federation pass (seeds x sweep variants) equals the same federation run alone,
with and without DP, whatever the replica chunk size; and the sweep variants of one seed share their
random numbers (clients, batches, Poisson masks, the standard-normal noise draw z).

Two checks per case. (1) fp32, chunks of exactly one federation's replicas: every GEMM has the shape it
has alone, so the pass must equal the solo run bit for bit. (2) fp64, chunk sizes that mix federations
(1, 3, all): GEMM shapes differ, so only rounding may differ. In fp32 that rounding measures up to
~1.3e-6 relative after 2 rounds (momentum SGD); in fp64 ~2e-15, which is why (2) runs in fp64 and can
demand 1e-12: anything that depends on a neighbour (a key, a shared statistic) is off by O(1).
"""
import pytest
import torch

from fedsim.engine import DPSetup
from partitions import dirichlet_label_skew
from tests.helpers import make_engine, rel_err

OPT = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
TARGETS = ["query", "value"]
NUM_CLIENTS, FRACTION = 3, 2 / 3          # 2 of 3 clients per round: client sampling is exercised
DP = DPSetup(max_grad_norm=0.5, sample_rate=0.05, max_batch=32)
TOL_FP64 = 1e-12                          # relative, on every final global tensor

# Federations of one pass: (seed, lr, lora alpha, noise multiplier, clip norm). A dp.epsilon sweep reaches
# the engine as one noise multiplier per federation (fedsim.run calibrates each epsilon), so "epsilon"
# varies sigma; a dp.max_grad_norm sweep gives each federation its own clip norm C (noise std sigma * C).
PASSES = {
    "seeds": [(3, 0.1, 8.0, 0.7, 0.5), (4, 0.1, 8.0, 0.7, 0.5), (5, 0.1, 8.0, 0.7, 0.5)],
    "optimizer.lr": [(3, 0.1, 8.0, 0.7, 0.5), (3, 0.03, 8.0, 0.7, 0.5), (4, 0.1, 8.0, 0.7, 0.5), (4, 0.03, 8.0, 0.7, 0.5)],
    "lora.alpha": [(3, 0.1, 8.0, 0.7, 0.5), (3, 0.1, 32.0, 0.7, 0.5), (4, 0.1, 8.0, 0.7, 0.5), (4, 0.1, 32.0, 0.7, 0.5)],
    "dp.epsilon": [(3, 0.1, 8.0, 0.7, 0.5), (3, 0.1, 8.0, 2.0, 0.5), (4, 0.1, 8.0, 0.7, 0.5), (4, 0.1, 8.0, 2.0, 0.5)],
    "dp.max_grad_norm": [(3, 0.1, 8.0, 0.7, 0.5), (3, 0.1, 8.0, 0.7, 0.05), (4, 0.1, 8.0, 0.7, 0.5),
                         (4, 0.1, 8.0, 0.7, 0.05)],
}
PRIVATE_ONLY = ("dp.epsilon", "dp.max_grad_norm")
CASES = [(k, private) for k in PASSES for private in (False, True) if private or k not in PRIVATE_ONLY]


def _engine(make_model, data, feds, private, chunk, K=2):
    labels = data["labels"].numpy()
    parts = [dirichlet_label_skew(labels, NUM_CLIENTS, alpha=0.5, seed=s) for s, *_ in feds]
    return make_engine(make_model, data, parts, seeds=[f[0] for f in feds], optimizer=OPT, targets=TARGETS,
                        fraction=FRACTION, K=K, alphas=[f[2] for f in feds], lrs=[f[1] for f in feds],
                        dp=DP if private else None, sigmas=[f[3] if private else 0.0 for f in feds],
                        clips=[f[4] for f in feds] if private else None, chunk=chunk)


def _final_global(engine, rounds=2):
    """The global tensors after `rounds` rounds, and every client-local tensor store (key `client:<name>`)."""
    for _ in range(rounds):
        engine.run_round()
    return {**engine.global_state, **{f"client:{n}": v for n, v in engine.client_state.items()}}


@pytest.mark.parametrize("key,private", CASES, ids=[f"{k}-{'dp' if p else 'nodp'}" for k, p in CASES])
def test_federation_in_a_pass_equals_itself_alone(make_model, sst2_small, key, private):
    feds = PASSES[key]
    m = 2                                                   # sampled clients per round = replicas per federation
    alone = [_final_global(_engine(make_model, sst2_small, [f], private, chunk=m)) for f in feds]
    shared = _final_global(_engine(make_model, sst2_small, feds, private, chunk=m))
    for f, solo in enumerate(alone):
        for name, tensor in solo.items():
            assert torch.equal(shared[name][f], tensor[0]), f"federation {feds[f]}: {name} differs from its solo run"
    flat = torch.cat([v.flatten(1) for v in shared.values()], 1)   # the federations differ (copies would pass)
    assert all(rel_err(flat[f], flat[0]) > 1e-5 for f in range(1, len(feds)))

    fp64 = lambda: make_model().to(torch.float64)           # noqa: E731
    alone = [_final_global(_engine(fp64, sst2_small, [f], private, chunk=m)) for f in feds]
    for chunk in (1, 3, len(feds) * m):                    # 3 splits federations across chunks
        shared = _final_global(_engine(fp64, sst2_small, feds, private, chunk))
        for f, solo in enumerate(alone):
            for name, tensor in solo.items():
                err = rel_err(shared[name][f], tensor[0])
                assert err < TOL_FP64, f"federation {feds[f]} chunk {chunk}: {name} differs from its solo run by {err:.2e}"


def test_sweep_variants_share_clients_batches_and_masks(make_model, sst2_small):
    feds = PASSES["optimizer.lr"]                          # seed 3 twice, then seed 4 twice
    for private in (False, True):
        eng = _engine(make_model, sst2_small, feds, private, chunk=None)
        for t in range(3):
            plan = eng.plan_round(t)
            sampled, rows, masks = plan.sampled, plan.rows, plan.masks
            m = eng.clients_per_round
            assert (sampled[0] == sampled[1]).all() and (sampled[2] == sampled[3]).all()
            assert torch.equal(rows[:m], rows[m:2 * m]) and torch.equal(masks[:m], masks[m:2 * m])
            assert torch.equal(rows[2 * m:3 * m], rows[3 * m:])
            assert not torch.equal(rows[:m], rows[2 * m:3 * m])      # another seed, other batches


def test_sweep_variants_share_the_noise_draw(make_model, sst2_small):
    """Three noise levels of one seed, one SGD step: the update is linear in sigma * z, so with a shared z
    global(2s) - global(0) = 2 (global(s) - global(0)) exactly (up to float rounding)."""
    feds = [(3, 0.1, 8.0, 0.0, 0.5), (3, 0.1, 8.0, 1.5, 0.5), (3, 0.1, 8.0, 3.0, 0.5)]
    g = _engine(make_model, sst2_small, feds, True, chunk=None, K=1)
    g.opt_cfg = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
    state = _final_global(g, rounds=1)
    for name, v in state.items():
        if name.endswith("lora_A"):
            continue                                   # A's per-sample grads are 0 at B = 0: no signal, only noise
        d1, d2 = v[1] - v[0], v[2] - v[0]
        assert d1.norm() > 0
        assert rel_err(d2, 2 * d1) < 1e-4, name


METHODS = [
    {"name": "ffa_lora"},
    {"name": "slora", "stage1_rounds": 1, "density": 0.05},            # both stages in 2 rounds
    {"name": "sa_fedlora", "init_rounds": 1, "anneal_rounds": 1, "cooling_rank": 2, "mu": 0.1},  # 3 rounds:
    # proximal term in round 1, rank 4 in round 2, truncated to rank 2 at the start of round 3
    {"name": "fedavg_fft"},
    {"name": "fedsa_lora"},                                            # client-local B, stored per client id
    {"name": "local_lora"},                                            # everything client-local, nothing sent
    {"name": "fedprox", "mu": 0.5},                                    # proximal term toward each one's global
    {"name": "scaffold"},                                              # control variates per federation, client
    {"name": "fedex_lora"},                                            # residual folded into each one's weights
    {"name": "flora"},                                                 # products folded, fresh factors per round
    {"name": "hetlora", "rank_choices": [1, 2, 4]},                    # client ranks keyed by each one's seed
    {"name": "hetlora", "rank_choices": [2, 4], "prune_gamma": 0.5, "prune_lambda": 1.0},   # ranks pruned per client
    {"name": "flora", "rank_choices": [1, 2, 4]},                      # stacks of heterogeneous ranks
]


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] + ("-ranks" if "rank_choices" in m and m["name"] == "flora"
                                                              else "-pruning" if "prune_gamma" in m else "")
                                                 for m in METHODS])
def test_every_method_in_a_pass_equals_itself_alone(make_model, sst2_small, method):
    """Method hooks (stage switches, rank truncation, proximal terms, full fine-tuning) keep federations
    apart too: two seeds x two learning rates in one pass, each equal to its solo run bit for bit (fp32,
    chunks of one federation's replicas)."""
    feds = PASSES["optimizer.lr"]
    labels = sst2_small["labels"].numpy()

    def engine(fs):
        parts = [dirichlet_label_skew(labels, NUM_CLIENTS, alpha=0.5, seed=s) for s, *_ in fs]
        return make_engine(make_model, sst2_small, parts, seeds=[f[0] for f in fs], optimizer=OPT,
                            targets=TARGETS, fraction=FRACTION, K=2, lrs=[f[1] for f in fs], method=method, chunk=2)
    pruning = "prune_gamma" in method
    rounds = 3 if method["name"] == "sa_fedlora" or pruning else 2
    passed = engine(feds)
    shared = _final_global(passed, rounds)
    if method["name"] == "sa_fedlora":
        assert shared[next(n for n in shared if n.endswith("lora_A"))].shape[1] == 2     # truncation happened
    if method["name"] == "fedsa_lora":
        assert any(n.startswith("client:") for n in shared)                             # client stores compared
    if pruning:
        assert passed.method.ranks.lowered                                               # some clients pruned
    for f, fed in enumerate(feds):
        alone = engine([fed])
        solo = _final_global(alone, rounds)
        if pruning:
            assert {c: r for (g, c), r in passed.method.ranks.lowered.items() if g == f} == \
                {c: r for (_, c), r in alone.method.ranks.lowered.items()}
        for name, tensor in solo.items():
            assert torch.equal(shared[name][f], tensor[0]), f"{method['name']} federation {fed}: {name}"
