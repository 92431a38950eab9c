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


# --- local rank self-pruning -----------------------------------------------------------------------------------
PRUNING = {"name": "hetlora", "rank_choices": [2, 4], "prune_gamma": 0.5, "prune_lambda": 0.3}


def test_pruning_penalty_gradient_is_that_of_the_norm_product():
    """The hook's gradient equals autograd of lambda sum_r ||A_r[k_r:r_r]|| ||B_r[:, k_r:r_r]||, k_r = floor(gamma r_r),
    written per client with plain slicing."""
    from methods import make_method
    method = make_method(PRUNING, {"rank": 4, "alpha": 8.0, "targets": TARGETS})
    method.ranks.seeds = [SEED]
    ids = [(0, c) for c in range(12)]
    ranks = [method.client_rank(f, c) for f, c in ids]
    assert set(ranks) == {2, 4}
    g = torch.Generator().manual_seed(0)
    A = torch.randn(len(ids), 4, 6, generator=g, dtype=torch.float64)
    B = torch.randn(len(ids), 5, 4, generator=g, dtype=torch.float64)
    for r, rank in enumerate(ranks):                               # what a client holds
        A[r, rank:], B[r, :, rank:] = 0, 0
    A.requires_grad_(), B.requires_grad_()
    penalty = sum(0.3 * A[r, rank // 2:rank].norm() * B[r, :, rank // 2:rank].norm() for r, rank in enumerate(ranks))
    want_A, want_B = torch.autograd.grad(penalty, (A, B))
    tensors = {"l.lora_A": A.detach(), "l.lora_B": B.detach()}
    got_A = method.local_regularizer_grad("l.lora_A", tensors["l.lora_A"], None, 0, ids, tensors.__getitem__)
    got_B = method.local_regularizer_grad("l.lora_B", tensors["l.lora_B"], None, 0, ids, tensors.__getitem__)
    torch.testing.assert_close(got_A, want_A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_B, want_B, rtol=1e-12, atol=1e-14)
    assert method.local_regularizer_grad("head.weight", A, None, 0, ids, tensors.__getitem__) is None


def test_a_client_whose_tail_shrinks_prunes_it(make_model, sst2_small):
    """Q_i below its previous participation's: rank -> floor(gamma r_i), the sent factors lose those slots, the
    record restarts; equal or larger Q_i, or a first participation: nothing but the record."""
    eng, _ = _engine(make_model, sst2_small, {**PRUNING, "rank_choices": [4]})
    plan = eng.plan_round(0)
    method, m = eng.method, len(plan.client_ids)
    g = torch.Generator().manual_seed(1)
    states = {n: torch.randn(1, m, *eng.global_state[n].shape[1:], generator=g) for n in eng.global_state
              if n.endswith((".lora_A", ".lora_B"))}
    first = method.prune(states, plan)
    assert all(first[n] is states[n] for n in states)             # a first participation only records
    assert all(method.client_rank(f, c) == 4 for f, c in plan.client_ids)
    shrunk = {n: v.clone() for n, v in states.items()}
    for n, v in shrunk.items():                                    # client 0's tail halves, client 1's doubles
        tail = (slice(None), 0, slice(2, None)) if n.endswith("A") else (slice(None), 0, slice(None), slice(2, None))
        v[tail] *= 0.5
        tail = (slice(None), 1, slice(2, None)) if n.endswith("A") else (slice(None), 1, slice(None), slice(2, None))
        v[tail] *= 2.0
    sent = method.prune(shrunk, plan)
    ranks = [method.client_rank(f, c) for f, c in plan.client_ids]
    assert ranks == [2] + [4] * (m - 1)
    assert (0, plan.client_ids[0][1]) not in method.last_tail
    for n, v in sent.items():
        if n.endswith(".lora_A"):
            assert not v[0, 0, 2:].any() and torch.equal(v[0, 0, :2], shrunk[n][0, 0, :2])
        else:
            assert not v[0, 0, :, 2:].any() and torch.equal(v[0, 0, :, :2], shrunk[n][0, 0, :, :2])
        assert torch.equal(v[0, 1:], shrunk[n][0, 1:])
        assert shrunk[n][0, 0].count_nonzero() == shrunk[n][0, 0].numel()       # the input is not modified


def test_pruned_clients_train_and_are_billed_at_their_new_rank(make_model, sst2_small):
    """End to end: with a strong penalty clients prune; the round a client prunes it receives at its old rank and
    sends at its new one, and from then on it holds only the new rank's slots. A run resumed after some clients
    pruned equals the unbroken one."""
    method = {**PRUNING, "rank_choices": [4], "prune_lambda": 2.0}
    eng, _ = _engine(make_model, sst2_small, method)
    per_slot = 4 * 2 * 2 * (2 * 384)                           # fp32 A row and B column of 2 layers x 2 targets
    pruned_in = {}
    for t in range(4):
        plan = eng.plan_round(t)
        before = {fc: eng.method.client_rank(*fc) for fc in plan.client_ids}
        if t == 3:
            state = eng.state_dict()
        eng.run_round()
        entry = eng.ledger.rounds[-1]
        for r, fc in enumerate(plan.client_ids):
            after = eng.method.client_rank(*fc)
            assert entry["down_per_client"][r] - entry["up_per_client"][r] == (before[fc] - after) * per_slot
            if after < before[fc]:
                pruned_in[fc] = t
            A = eng.tensors[next(n for n in eng.tensors if n.endswith(".lora_A"))].detach()
            assert not A[r, before[fc]:].any()
    assert pruned_in and min(pruned_in.values()) < 3, pruned_in      # the checkpoint holds lowered ranks
    resumed, _ = _engine(make_model, sst2_small, method)
    resumed.load_state_dict(state)
    resumed.run_round()
    for n, v in eng.global_state.items():
        assert torch.equal(resumed.global_state[n], v), n


def test_bad_pruning_parameters_are_refused():
    from methods import make_method
    lora = {"rank": 8, "alpha": 16.0, "targets": TARGETS}
    with pytest.raises(ValueError, match=r"prune_gamma must be in \(0, 1\)"):
        make_method({"name": "hetlora", "prune_gamma": 1.0}, lora)
    with pytest.raises(ValueError, match="prune_lambda must be >= 0"):
        make_method({"name": "hetlora", "prune_gamma": 0.5, "prune_lambda": -1.0}, lora)
    assert make_method({"name": "hetlora"}, lora).client_dp_unsupported is None
    assert "unnoised" in make_method({"name": "hetlora", "prune_gamma": 0.5}, lora).client_dp_unsupported
