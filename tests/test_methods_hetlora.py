"""HetLoRA (methods/hetlora.py): each client trains LoRA at its own rank r_i <= r; slots beyond r_i stay exactly
zero (even under DP noise), the server averages the zero-padded factors, the ledger counts each client's own
bytes; with every rank equal to r it is FedAvg-LoRA bit for bit."""
import math

import pytest
import torch

from fedsim.dp import max_poisson_batch
from fedsim.engine import DPSetup
from partitions import dirichlet_label_skew
from tests.helpers import make_engine

SGD = {"name": "sgd", "lr": 0.3, "momentum": 0.0}
TARGETS = ["query", "value"]
CLIENTS, FRACTION, SEED = 4, 0.75, 1


def _engine(make_model, data, method, dp=False):
    parts = dirichlet_label_skew(data["labels"].numpy(), CLIENTS, alpha=0.5, seed=SEED)
    kw = {}
    if dp:
        q = 0.1
        kw = dict(dp=DPSetup(max_grad_norm=1.0, sample_rate=q, max_batch=max_poisson_batch(q * max(map(len, parts)))),
                  sigmas=[0.8])
    return make_engine(make_model, data, [parts], seeds=[SEED], optimizer=SGD, targets=TARGETS, fraction=FRACTION,
                       rank=4, method=method, **kw), parts


def test_every_client_at_the_global_rank_is_fedavg(make_model, sst2_small):
    het, _ = _engine(make_model, sst2_small, {"name": "hetlora", "rank_choices": [4]})
    avg, _ = _engine(make_model, sst2_small, "fedavg_lora")
    for _ in range(2):
        het.run_round()
        avg.run_round()
    for n, v in avg.global_state.items():
        assert torch.equal(het.global_state[n], v), n


@pytest.mark.parametrize("dp", [False, True])
def test_clients_train_their_rank_and_the_server_averages_zero_padded(make_model, sst2_small, dp):
    eng, parts = _engine(make_model, sst2_small, {"name": "hetlora", "rank_choices": [1, 2, 4]}, dp=dp)
    for t in range(2):
        plan = eng.plan_round(t)
        ranks = [eng.method.client_rank(f, c) for f, c in plan.client_ids]
        before = {n: v.clone() for n, v in eng.global_state.items()}
        eng.run_round()
        assert len(set(ranks)) > 1, ranks                         # the seed gives clients of different ranks
        sizes = torch.tensor([len(parts[c]) for _, c in plan.client_ids], dtype=torch.float32)
        w = sizes / sizes.sum()
        for n, v in eng.tensors.items():
            client = v.detach()
            if n.endswith(".lora_A"):
                for r, rank in enumerate(ranks):
                    assert not client[r, rank:].any() and client[r, :rank].any(), (n, r, rank)
            if n.endswith(".lora_B"):
                for r, rank in enumerate(ranks):
                    assert not client[r, :, rank:].any() and client[r, :, :rank].any(), (n, r, rank)
            want = torch.einsum("m,m...->...", w, client)
            torch.testing.assert_close(eng.global_state[n][0], want, rtol=1e-6, atol=1e-8)
        # what a client received: the global truncated to its rank (its slots moved from there)
        A = next(n for n in before if n.endswith(".lora_A"))
        small = ranks.index(min(ranks))
        assert not torch.equal(eng.tensors[A][small, :min(ranks)], before[A][0, :min(ranks)])


def test_ledger_counts_each_clients_rank(make_model, sst2_small):
    eng, _ = _engine(make_model, sst2_small, {"name": "hetlora", "rank_choices": [1, 2, 4]})
    plan = eng.plan_round(0)
    eng.run_round()
    entry = eng.ledger.rounds[0]
    hidden, layers = 384, 2
    head = 4 * (2 * hidden + 2)
    want = [4 * layers * 2 * (2 * hidden) * eng.method.client_rank(f, c) + head for f, c in plan.client_ids]
    assert entry["up_per_client"] == want == entry["down_per_client"]
    assert entry["up"] == [sum(want)] and eng.ledger.cumulative("up") == [sum(want)]


def test_norm_weighting_weighs_each_adapter_by_its_update(make_model, sst2_small):
    eng, _ = _engine(make_model, sst2_small, {"name": "hetlora", "rank_choices": [1, 2, 4], "weighting": "norm"})
    eng.run_round()
    for layer in eng.stacked.lora:
        A, B = eng.tensors[layer + ".lora_A"].detach(), eng.tensors[layer + ".lora_B"].detach()
        norms = torch.stack([torch.linalg.matrix_norm(B[r] @ A[r]) for r in range(len(A))])
        w = norms / norms.sum()
        torch.testing.assert_close(eng.global_state[layer + ".lora_A"][0], torch.einsum("m,m...->...", w, A))
        assert not math.isclose(w.max().item(), w.min().item())


def test_ranks_above_the_global_rank_are_refused():
    from methods import make_method
    with pytest.raises(ValueError, match=r"rank_choices \[2, 16\] must be integers in 1..8"):
        make_method({"name": "hetlora", "rank_choices": [2, 16]}, {"rank": 8, "alpha": 16.0, "targets": TARGETS})
