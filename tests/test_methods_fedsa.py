"""FedSA-LoRA (methods/fedsa_lora.py): A and the head are shared and averaged; every client keeps its own B,
stored by the engine per client id, never sent. The proof that the method interface's client-local state is
right: the method file only says which tensors stay on the client."""
import pytest
import torch

from fedsim.engine import Federation, build_engine
from methods import make_method
from partitions import dirichlet_label_skew

LORA = {"rank": 4, "alpha": 8.0, "targets": ["query", "value"]}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
NUM_CLIENTS, FRACTION, SEED = 3, 2 / 3, 5


def engine(make_model, data, method_cfg):
    parts = dirichlet_label_skew(data["labels"].numpy(), NUM_CLIENTS, alpha=1.0, seed=SEED)
    feds = [Federation(seed=SEED, lr=SGD["lr"], lora_alpha=LORA["alpha"], partitions=parts)]
    return build_engine(make_method(method_cfg, LORA), make_model(), data, feds, local_steps=2, batch_size=4,
                        client_fraction=FRACTION, optimizer=SGD)


def replica_of(eng, t):
    """{client id: replica} of round t (one federation)."""
    return {int(c): r for r, c in enumerate(eng.plan_round(t).sampled[0])}


def test_fedsa_shares_A_keeps_B_on_each_client(make_model, sst2_small, monkeypatch):
    fedsa, fedavg = engine(make_model, sst2_small, {"name": "fedsa_lora"}), engine(make_model, sst2_small,
                                                                                  {"name": "fedavg_lora"})
    B = [n for n in fedsa.tensors if n.endswith(".lora_B")]
    A = [n for n in fedsa.tensors if n.endswith(".lora_A")]
    first, second = replica_of(fedsa, 0), replica_of(fedsa, 1)
    kept, fresh = sorted(set(first) & set(second)), sorted(set(second) - set(first))
    assert kept and fresh                                   # the seed gives both cases

    aggregated = []
    aggregate = fedsa.method.aggregate
    monkeypatch.setattr(fedsa.method, "aggregate",
                        lambda g, clients, *a: aggregated.append(set(clients)) or aggregate(g, clients, *a))
    fedsa.run_round()
    fedavg.run_round()
    # round 1 trains exactly as FedAvg-LoRA (same init, clients and batches); the server averages only A and head
    for n in A + ["classifier.weight", "classifier.bias"]:
        assert torch.equal(fedsa.global_state[n], fedavg.global_state[n]), n
    for n in B:
        assert not fedsa.global_state[n].any()              # the global B never moves: nobody sends one
        for c in range(NUM_CLIENTS):                        # each sampled client stored its own trained B
            want = fedavg.tensors[n][first[c]] if c in first else torch.zeros_like(fedsa.client_state[n][0, c])
            assert torch.equal(fedsa.client_state[n][0, c], want), (n, c)
    assert not any(n in names for names in aggregated for n in B)
    bytes_B = sum(fedsa.global_state[n][0].numel() * 4 for n in B)
    assert fedsa.ledger.rounds[0]["up_per_client"] == fedavg.ledger.rounds[0]["up_per_client"] - bytes_B
    assert fedsa.ledger.rounds[0]["down_per_client"] == fedsa.ledger.rounds[0]["up_per_client"]

    stored = {n: fedsa.client_state[n].clone() for n in B}
    seen = {}
    local_step = fedsa.local_step

    def capture(plan, s, rs, opt):
        if s == 0:
            seen.update({n: fedsa.tensors[n].detach().clone() for n in B + A})
        return local_step(plan, s, rs, opt)
    monkeypatch.setattr(fedsa, "local_step", capture)
    fedsa.run_round()
    for n in B:                          # round 2 starts each client from its own B (zero if never sampled)
        for c in kept + fresh:
            assert torch.equal(seen[n][second[c]], stored[n][0, c]), (n, c)
        assert any(seen[n][second[c]].any() for c in kept)
    for n in A:                          # ... and from the averaged A
        assert torch.equal(seen[n][0], seen[n][1])


def test_fedsa_client_state_survives_a_checkpoint(make_model, sst2_small):
    full = engine(make_model, sst2_small, {"name": "fedsa_lora"})
    for _ in range(3):
        full.run_round()
    part = engine(make_model, sst2_small, {"name": "fedsa_lora"})
    part.run_round()
    part.run_round()
    resumed = engine(make_model, sst2_small, {"name": "fedsa_lora"})
    resumed.load_state_dict(part.state_dict())
    resumed.run_round()
    assert set(resumed.client_state) == {n for n in full.tensors if n.endswith(".lora_B")}
    for n, v in full.client_state.items():
        assert torch.equal(resumed.client_state[n], v), n
    for n, v in full.global_state.items():
        assert torch.equal(resumed.global_state[n], v), n


@pytest.mark.parametrize("local_head", [False, True])
def test_fedsa_local_head_keeps_the_head_on_the_client(local_head):
    m = make_method({"name": "fedsa_lora", "local_head": local_head}, LORA)
    assert m.trained("x.lora_B", 0) and not m.shared("x.lora_B", 0) and m.client_local("x.lora_B", 0)
    assert m.trained("x.lora_A", 0) and m.shared("x.lora_A", 0) and not m.client_local("x.lora_A", 0)
    assert m.shared("classifier.weight", 0) != local_head
    with pytest.raises(ValueError, match="unknown parameter"):
        make_method({"name": "fedsa_lora", "share_b": True}, LORA)


def test_personal_accuracy_scores_each_client_own_model_on_its_held_out_rows(make_model, sst2_small):
    """evaluate_personal runs every client's model (global A and head, its own B) side by side; each client's
    accuracy equals a plain padded forward of that one model on that client's held-out rows. FedAvg-LoRA's
    clients all hold the global model, so there it is the global model's accuracy on the same rows."""
    from partitions import hold_out
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), NUM_CLIENTS, alpha=1.0, seed=SEED)
    train, held = hold_out(parts, 0.25, SEED)
    assert all(len(h) > 0 for h in held) and not any(set(a) & set(b) for a, b in zip(train, held))
    assert sorted(set().union(*map(set, train), *map(set, held))) == sorted(set().union(*map(set, parts)))
    for name in ("fedsa_lora", "fedavg_lora"):
        feds = [Federation(seed=s, lr=SGD["lr"], lora_alpha=a, partitions=train, personal_eval=held)
                for s, a in ((SEED, 8.0), (SEED + 1, 32.0))]                 # two federations, two LoRA scales
        eng = build_engine(make_method({"name": name}, LORA), make_model(), sst2_small, feds, local_steps=2,
                           batch_size=4, client_fraction=FRACTION, optimizer=SGD, replica_chunk=2)
        eng.eval_batch_size = 7                                              # several blocks per client
        for _ in range(2):
            eng.run_round()
        gen = torch.Generator().manual_seed(0)     # two rounds leave B tiny and the head near its bias: make
        for n in [n for n in eng.global_state if n.endswith(".lora_B")] + ["classifier.weight"]:   # them matter
            store = eng.client_state if n in eng.client_state else eng.global_state
            store[n] = 0.3 * torch.randn(store[n].shape, generator=gen)
        overall, each = eng.evaluate_personal()
        st = eng.stacked.state
        hits, total = torch.zeros(2), torch.zeros(2)
        with torch.no_grad():
            for f in range(2):
                for c in range(NUM_CLIENTS):
                    for n, g in eng.global_state.items():
                        eng.tensors[n][0] = eng.client_state[n][f, c] if n in eng.client_state else g[f]
                    for layer in eng.stacked.lora.values():
                        layer.scale[0] = feds[f].lora_alpha / LORA["rank"]
                    st.active = slice(0, 1)
                    rows = torch.as_tensor(held[c])
                    logits = eng.stacked(**{k: v[rows] for k, v in sst2_small.items() if k != "labels"})
                    right = (logits.argmax(-1) == sst2_small["labels"][rows]).float()
                    assert each[f][c] == pytest.approx(right.mean().item(), abs=1e-6), (name, f, c)
                    hits[f] += right.sum()
                    total[f] += len(rows)
        assert overall == pytest.approx((hits / total).tolist(), abs=1e-6)
        if name == "fedsa_lora":         # the clients' own B change what they predict
            assert len({round(x, 6) for f in range(2) for x in each[f]}) > 2
