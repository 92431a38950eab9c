"""FedEx-LoRA and FLoRA (methods/fedex_lora.py, methods/flora.py): the global model after aggregation is the
exact weighted mean of the clients' models -- W_folded + scale B A == sum_i w_i (W_folded + scale B_i A_i) --
which plain FedAvg-LoRA is not; the folded delta enters the forward as a change of the frozen weight."""
import pytest
import torch

from fedsim.packed import pack
from fedsim.stacked import StackedModel
from partitions import dirichlet_label_skew
from tests.helpers import make_engine, rel_err
from tests.test_stacked import random_batch

SGD = {"name": "sgd", "lr": 0.3, "momentum": 0.0}
TARGETS = ["query", "value"]


def effective(state, name, scale):
    """W_folded + scale B A of adapter `name`, per leading index, in fp64."""
    folded = state.get(name + ".folded")
    prod = scale * (state[name + ".lora_B"].double() @ state[name + ".lora_A"].double())
    return prod if folded is None else folded.double() + prod


HETEROGENEOUS_FLORA = {"name": "flora", "rank_choices": [1, 2, 4]}


@pytest.mark.parametrize("method,exact", [("fedex_lora", True), ("flora", True), (HETEROGENEOUS_FLORA, True),
                                          ("fedavg_lora", False)], ids=["fedex_lora", "flora", "flora-ranks", "fedavg"])
def test_global_model_is_the_weighted_mean_of_client_models(make_model, sst2_small, method, exact):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=0.5, seed=6)
    eng = make_engine(make_model, sst2_small, [parts], seeds=[6], optimizer=SGD, targets=TARGETS, fraction=2 / 3,
                      method=method)
    scale = 8.0 / 4
    adapters = list(eng.stacked.lora)
    for t in range(2):
        sampled = eng.plan_round(t).sampled[0]
        eng.run_round()
        sizes = torch.tensor([len(parts[c]) for c in sampled], dtype=torch.float64)
        w = sizes / sizes.sum()
        clients = {n: v.detach() for n, v in eng.tensors.items()}     # replicas: the clients' trained models
        errs = []
        for name in adapters:
            want = torch.einsum("m,moi->oi", w, effective(clients, name, scale))
            got = effective({n: v[0] for n, v in eng.global_state.items()}, name, scale)
            errs.append(rel_err(got, want))
        if exact:
            assert max(errs) < 1e-6, (t, max(errs))
        else:                                   # mean(B) mean(A) != mean(B A): what exact aggregation fixes
            assert max(errs) > 1e-3, (t, max(errs))
    if method in ("flora", HETEROGENEOUS_FLORA):     # each round starts from fresh factors: new A, zero B
        assert not any(eng.global_state[n + ".lora_B"].any() for n in adapters)
    if method == HETEROGENEOUS_FLORA:                # each client's product has its own rank
        ranks = [eng.method.ranks.rank(*fc) for fc in eng.plan_round(1).client_ids]
        assert len(set(ranks)) > 1, ranks
        for r, rank in enumerate(ranks):
            A, B = (clients[adapters[0] + s][r] for s in (".lora_A", ".lora_B"))
            assert torch.linalg.matrix_rank(B.double() @ A.double()) == rank


def test_folded_delta_is_a_change_of_the_frozen_weight(make_model):
    """Replica r's logits equal a plain model's whose adapted weights are W + folded_r + scale B_r A_r: padded
    and packed-token forwards."""
    R = 2
    stacked = StackedModel(make_model(), R, 4, TARGETS, folded=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, t in stacked.tensors().items():
            if n.endswith((".folded", ".lora_A", ".lora_B")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        for layer in stacked.lora.values():
            layer.scale.fill_(2.0)
    batch = random_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        padded = stacked(**{k: v.repeat(R, 1) for k, v in inputs.items()}).view(R, len(batch["labels"]), -1)
        st = stacked.state
        st.begin_pass(slice(0, R))
        packed_batch = pack(*(v.repeat(R, 1) for v in (inputs["input_ids"], inputs["attention_mask"],
                                                       inputs["token_type_ids"])))
        st.select_tokens(packed_batch, R)
        packed = stacked.forward_packed(packed_batch).view(R, len(batch["labels"]), -1)
        st.end_pass()
        for r in range(R):
            plain = make_model()
            for name, layer in stacked.lora.items():
                plain.get_submodule(name).weight += layer.folded[r] + 2.0 * layer.B[r] @ layer.A[r]
            want = plain(**inputs).logits
            torch.testing.assert_close(padded[r], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(packed[r], want, rtol=1e-4, atol=1e-5)


def test_bytes_of_exact_aggregation(make_model, sst2_small):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=0.5, seed=6)
    ledgers = {}
    for method in ("fedavg_lora", "fedex_lora", "flora"):
        eng = make_engine(make_model, sst2_small, [parts], seeds=[6], optimizer=SGD, targets=TARGETS,
                          fraction=2 / 3, method=method)
        eng.run_round()
        ledgers[method] = eng.ledger.rounds[0]
    layer = next(iter(eng.stacked.lora.values()))
    out, n_in = layer.base.weight.shape
    factors = len(eng.stacked.lora) * 4 * 4 * (out + n_in)              # fp32 A and B of every target, rank 4
    head = ledgers["fedavg_lora"]["up_per_client"] - factors
    assert ledgers["fedex_lora"]["up_per_client"] == ledgers["fedavg_lora"]["up_per_client"]
    assert ledgers["fedex_lora"]["down_per_client"] == factors + head + len(eng.stacked.lora) * 4 * out * n_in
    assert ledgers["flora"]["up_per_client"] == [factors + head] * 2
    assert ledgers["flora"]["down_per_client"] == [2 * factors + head] * 2   # the stack of 2 clients' factors
    eng = make_engine(make_model, sst2_small, [parts], seeds=[6], optimizer=SGD, targets=TARGETS, fraction=2 / 3,
                      method=HETEROGENEOUS_FLORA)
    plan = eng.plan_round(0)
    eng.run_round()
    ranks = [eng.method.ranks.rank(*fc) for fc in plan.client_ids]
    entry = eng.ledger.rounds[0]
    assert entry["up_per_client"] == [factors // 4 * r + head for r in ranks]
    assert entry["down_per_client"] == [factors // 4 * sum(ranks) + head] * 2


def test_a_trained_tensor_without_gradient_is_a_loud_error(make_model, sst2_small, monkeypatch):
    """The bug this file's first draft had: the folded delta marked trained. No layer differentiates it, so it
    would never move while the ledger counted it as uploaded; the engine refuses instead."""
    from methods.fedavg_lora import FedAvgLoRA
    from methods.fedex_lora import FedExLoRA
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=0.5, seed=6)
    eng = make_engine(make_model, sst2_small, [parts], seeds=[6], optimizer=SGD, targets=TARGETS, fraction=2 / 3,
                      method="fedex_lora")
    monkeypatch.setattr(FedExLoRA, "trained", FedAvgLoRA.trained)       # every tensor, the folded delta included
    with pytest.raises(RuntimeError, match=r"got no gradient .*\.folded"):
        eng.run_round()
