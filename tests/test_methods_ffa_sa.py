"""FFA-LoRA (frozen shared A) and SA-FedLoRA (proximal start, SVD-truncated rank annealing)."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsim.engine import Federation, build_engine
from fedsim.reference import run_reference
from fedsim.stacked import StackedModel
from methods import make_method
from methods.sa_fedlora import SCHEDULES
from partitions import dirichlet_label_skew
from tests.helpers import assert_same, make_engine, reference_cfg, rel_err

QV = ["query", "value"]
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}


def engine(make_model, data, parts, method_cfg, *, rank=4, alphas=(8.0,), lrs=(0.1,), seeds=None, K=1, b=4,
           fraction=1.0, optimizer=SGD):
    """One federation per (alpha, lr) pair, all on the same seed and partitions unless seeds are given."""
    method = make_method(method_cfg, {"rank": rank, "alpha": alphas[0], "targets": QV})
    seeds = seeds or [0] * len(alphas)
    feds = [Federation(seed=s, lr=lr, lora_alpha=a, partitions=parts) for s, a, lr in zip(seeds, alphas, lrs)]
    return build_engine(method, make_model(), data, feds, local_steps=K, batch_size=b, client_fraction=fraction,
                        optimizer=optimizer)


def adapters(state, layer):
    return state[layer + ".lora_A"], state[layer + ".lora_B"]


def effective_deltas(eng):
    """{module: [F, out, in]} scale * B @ A of each federation's global model."""
    F_ = len(eng.federations)
    out = {}
    for name, layer in eng.stacked.lora.items():
        A, B = adapters(eng.global_state, name)
        out[name] = layer.scale.view(F_, -1)[:, 0, None, None] * (B @ A)
    return out


# ------------------------------------------------------------------------------------------------ FFA-LoRA

def test_ffa_freezes_shared_A_and_equals_reference(make_model, sst2_small):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 4, alpha=0.5, seed=0)
    eng = make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer=SGD, targets=QV, fraction=0.5,
                       K=2, method="ffa_lora")
    init = {k: v[0].clone() for k, v in eng.global_state.items()}
    for _ in range(2):
        eng.run_round()
        for name in eng.stacked.lora:      # every client trained with the very same A, still the initial one
            A = eng.tensors[name + ".lora_A"]
            assert all(torch.equal(A[r], init[name + ".lora_A"]) for r in range(A.shape[0]))
            assert torch.equal(eng.global_state[name + ".lora_A"][0], init[name + ".lora_A"])
    for name in eng.stacked.lora:
        assert eng.global_state[name + ".lora_B"][0].norm() > 0
    assert not torch.equal(eng.global_state["classifier.weight"][0], init["classifier.weight"])
    ref, _ = run_reference(make_model, sst2_small, parts, init,
                           reference_cfg(SGD, QV, 0.5, K=2, train_A=False))
    assert_same({k: v[0] for k, v in eng.global_state.items()}, ref)


ROUND_0 = SimpleNamespace(round=0)     # payload_bytes reads only the round of a plan


def test_ffa_uploads_half_the_adapter_bytes(make_model):
    stacked = StackedModel(make_model(), 1, 4, QV)
    lora = {"rank": 4, "alpha": 8.0, "targets": QV}
    fedavg = make_method({"name": "fedavg_lora"}, lora)
    state = fedavg.init_global(stacked.layout(1), [0]).global_state
    head = sum(t[0].numel() * t.element_size() for n, t in state.items() if n.startswith("classifier"))
    b_bytes = sum(t[0].numel() * t.element_size() for n, t in state.items() if n.endswith(".lora_B"))
    up_avg, _ = fedavg.payload_bytes(state, ROUND_0)
    for train_head, extra in ((True, head), (False, 0)):
        ffa = make_method({"name": "ffa_lora", "train_head": train_head}, lora)
        up, down = ffa.payload_bytes(ffa.init_global(stacked.layout(1), [0]).global_state, ROUND_0)
        assert up == down == b_bytes + extra            # A never travels: clients re-derive it from the seed
        assert 2 * (up - extra) == up_avg - head       # query/value are square: B is half the adapter


def test_ffa_alpha_lr_invariance_vs_fedavg(make_model, sst2_small):
    """Plain SGD, head frozen, one local step per round: alpha*k with lr/k^2 leaves FFA-LoRA's W + (alpha/r) B@A
    unchanged at every step (k = 4 and 1/4, three federations in one pass); FedAvg-LoRA's trajectory moves."""
    parts = [np.arange(0, 8), np.arange(8, 16)]          # b = client size: every federation sees the same batches
    alphas, lr = (8.0, 32.0, 2.0), 1.0
    lrs = (lr, lr / 16, lr * 16)
    ffa = engine(make_model, sst2_small, parts, {"name": "ffa_lora", "train_head": False}, alphas=alphas, lrs=lrs, b=8)
    avg = engine(make_model, sst2_small, parts, {"name": "fedavg_lora"}, alphas=alphas, lrs=lrs, b=8)
    avg_gap = 0.0
    for _ in range(3):
        ffa.run_round()
        avg.run_round()
        for d in effective_deltas(ffa).values():
            assert d[0].norm() > 0
            assert rel_err(d[1], d[0]) < 1e-5 and rel_err(d[2], d[0]) < 1e-5     # fp32: batch order differs
        avg_gap = max(avg_gap, *(min(rel_err(d[1], d[0]), rel_err(d[2], d[0])) for d in effective_deltas(avg).values()))
    assert avg_gap > 0.1, f"FedAvg-LoRA barely changed ({avg_gap:.1e})"


# ------------------------------------------------------------------------------------------------ SA-FedLoRA

def sa_cfg(**kw):
    return dict({"name": "sa_fedlora"}, **kw)


def test_sa_without_prox_and_annealing_is_fedavg(make_model, sst2_small):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=0.5, seed=2)
    runs = []
    for cfg in ({"name": "fedavg_lora"}, sa_cfg(mu=0.0, cooling_rank=4, init_rounds=1)):
        eng = engine(make_model, sst2_small, parts, cfg, K=2, fraction=2 / 3)
        for _ in range(2):
            eng.run_round()
        runs.append(eng)
    for k, v in runs[0].global_state.items():
        assert torch.equal(v, runs[1].global_state[k]), k
    assert runs[0].ledger.rounds == runs[1].ledger.rounds


def test_sa_rank_anneals_bytes_follow_and_resume(make_model, sst2_small):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 2, alpha=1.0, seed=3)
    cfg = sa_cfg(mu=0.1, init_rounds=1, heating_rounds=1, anneal_rounds=3, cooling_rank=2, schedule="linear")
    eng = engine(make_model, sst2_small, parts, cfg, rank=8)
    ranks, ups, ckpt = [], [], None
    for t in range(6):
        if t == 3:
            ckpt = copy.deepcopy(eng.state_dict())
        eng.run_round()
        ranks.append(eng.stacked.rank)
        ups.append(eng.ledger.rounds[-1]["up_per_client"])
    assert ranks == [8, 8, 8, 6, 4, 2]
    assert all(a >= b for a, b in zip(ranks, ranks[1:]))
    head = sum(t[0].numel() * 4 for n, t in eng.global_state.items() if n.startswith("classifier"))
    per_rank = sum((lay.base.in_features + lay.base.out_features) * 4 for lay in eng.stacked.lora.values())
    assert [u - head for u in ups] == [r * per_rank for r in ranks]
    # a fresh engine (model built at the heating rank) resumed from the checkpoint ends bitwise the same
    resumed = engine(make_model, sst2_small, parts, cfg, rank=8)
    resumed.load_state_dict(ckpt)
    for _ in range(3):
        resumed.run_round()
    for k, v in eng.global_state.items():
        assert torch.equal(v, resumed.global_state[k]), k
    assert resumed.ledger.rounds == eng.ledger.rounds


@pytest.mark.parametrize("alpha_over", ["heating_rank", "current_rank"])
def test_sa_truncation_keeps_top_singular_directions(make_model, alpha_over):
    """Global B@A with known singular values, two federations with different alphas -> Eckart-Young."""
    r, k, F_ = 6, 2, 2
    method = make_method(sa_cfg(cooling_rank=k, init_rounds=0, anneal_rounds=1, alpha_over=alpha_over),
                         {"rank": r, "alpha": 12.0, "targets": QV})
    stacked = StackedModel(make_model(), F_, r, QV)
    for layer in stacked.lora.values():
        layer.scale.copy_(torch.tensor([12.0 / r, 3.0 / r]))
    g = torch.Generator().manual_seed(0)
    state, target, best = {}, {}, {}
    S = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64).expand(F_, r)
    for name, layer in stacked.lora.items():
        out, n_in = layer.base.out_features, layer.base.in_features
        U = torch.linalg.qr(torch.randn(F_, out, r, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(F_, n_in, r, generator=g, dtype=torch.float64))[0]
        scale = layer.scale.double()[:, None, None]
        state[name + ".lora_B"] = (U * S[:, None, :] / scale).float()       # scale * B @ A = U S V^T
        state[name + ".lora_A"] = V.transpose(1, 2).float()
        target[name] = scale * state[name + ".lora_B"].double() @ state[name + ".lora_A"].double()
        best[name] = (U[:, :, :k] * S[:, None, :k]) @ V[:, :, :k].transpose(1, 2)    # Eckart-Young
    first = next(iter(stacked.lora))            # cross-check the closed form with torch's SVD once
    u, s, vh = torch.linalg.svd(target[first])
    assert rel_err(u[:, :, :k] * s[:, None, :k] @ vh[:, :k], best[first]) < 1e-6
    change = method.on_round_start(1, state, stacked.layout(F_))
    stacked.apply(change, clients_per_round=1)
    new = change.global_state
    assert stacked.rank == k and method.rank == k
    for name, layer in stacked.lora.items():
        A, B = adapters(new, name)
        assert A.shape[1] == B.shape[2] == k and layer.A.shape[1] == k
        got = layer.scale.double()[:, None, None] * B.double() @ A.double()
        assert rel_err(got, best[name]) < 1e-6
        residual = (target[name] - got).flatten(1).norm(dim=1)
        assert torch.allclose(residual, S[:, k:].pow(2).sum(1).sqrt(), rtol=1e-5)
        assert torch.allclose(B.norm(dim=1), A.norm(dim=2), rtol=1e-4)      # balanced split
    expected = [12.0 / k, 3.0 / k] if alpha_over == "current_rank" else [12.0 / r, 3.0 / r]
    assert all(torch.allclose(layer.scale, torch.tensor(expected)) for layer in stacked.lora.values())


def test_sa_proximal_term_limits_drift(make_model, sst2_small):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 2, alpha=0.5, seed=4)
    drift = {}
    for mu in (0.0, 8.0):                   # lr * mu = 0.8: each step pulls 80% of the way back
        eng = engine(make_model, sst2_small, parts, sa_cfg(mu=mu, init_rounds=1, cooling_rank=4), K=6, lrs=(0.1,))
        start = {n: v.clone() for n, v in eng.global_state.items()}
        eng.run_round()
        drift[mu] = sum((eng.tensors[n] - start[n].repeat_interleave(eng.clients_per_round, 0)).pow(2).sum() for n in start).sqrt()
    assert drift[8.0] < 0.5 * drift[0.0], drift


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_sa_schedules_shrink_from_heating_to_cooling(schedule):
    m = make_method(sa_cfg(init_rounds=2, heating_rounds=1, anneal_rounds=7, cooling_rank=2, schedule=schedule),
                    {"rank": 16, "alpha": 16.0, "targets": QV})
    ranks = [m.rank_at(t) for t in range(14)]
    assert ranks[:4] == [16] * 4 and ranks[10:] == [2] * 4
    assert all(a >= b for a, b in zip(ranks, ranks[1:])) and 2 < ranks[6] < 16


# ------------------------------------------------------------------------------------------------ config errors

@pytest.mark.parametrize("name,params,match", [
    ("ffa_lora", {"freeze_head": True}, r"valid: \['train_head'\]"),
    ("sa_fedlora", {"rank_min": 2}, r"valid: \['init_rounds', 'mu', .*'cooling_rank', 'schedule'"),
    ("sa_fedlora", {"heating_rank": 16}, "must equal lora.rank=8"),
    ("sa_fedlora", {"cooling_rank": 9}, "cooling_rank must be in"),
    ("sa_fedlora", {"schedule": "step"}, "valid: \\['linear', 'cosine', 'exponential', 'cubic'\\]"),
])
def test_bad_method_params_are_clear_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_method(dict(params, name=name), {"rank": 8, "alpha": 16.0, "targets": QV})
