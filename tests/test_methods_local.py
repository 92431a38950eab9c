"""The personalized baselines: local-only LoRA (methods/local_lora.py: every trained tensor stays on its client,
nothing is sent) and the local majority label (fedsim.evaluation.personal_majority_accuracy)."""
import numpy as np
import pytest
import torch

from fedsim.engine import Federation
from fedsim.evaluation import personal_majority_accuracy
from methods import make_method
from partitions import dirichlet_label_skew
from tests.helpers import make_engine

LORA = {"rank": 4, "alpha": 8.0, "targets": ["query", "value"]}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
NUM_CLIENTS, FRACTION, SEED = 3, 2 / 3, 5


def engine(make_model, data, name):
    parts = dirichlet_label_skew(data["labels"].numpy(), NUM_CLIENTS, alpha=1.0, seed=SEED)
    return make_engine(make_model, data, [parts], seeds=[SEED], optimizer=SGD, targets=LORA["targets"],
                       fraction=FRACTION, K=2, b=4, rank=LORA["rank"], alpha=LORA["alpha"], method=name)


def test_local_lora_keeps_everything_on_the_client_and_sends_nothing(make_model, sst2_small, monkeypatch):
    """Round 1 trains exactly as FedAvg-LoRA (same init, clients, batches); each sampled client stores what it
    trained, the global model never moves, no byte is sent, and round 2 starts each client where it stopped."""
    local, fedavg = engine(make_model, sst2_small, "local_lora"), engine(make_model, sst2_small, "fedavg_lora")
    trained = [n for n in local.tensors if local.method.trained(n, 0)]
    initial = {n: v.clone() for n, v in local.global_state.items()}
    first = {int(c): r for r, c in enumerate(local.plan_round(0).sampled[0])}
    second = {int(c): r for r, c in enumerate(local.plan_round(1).sampled[0])}
    local.run_round()
    fedavg.run_round()
    assert sorted(local.client_state) == sorted(trained) and any(n.endswith(".lora_A") for n in trained)
    for n in trained:
        for c in range(NUM_CLIENTS):
            want = fedavg.tensors[n][first[c]] if c in first else initial[n][0]
            assert torch.equal(local.client_state[n][0, c], want), (n, c)
    assert local.ledger.rounds[0]["up_per_client"] == 0 and local.ledger.rounds[0]["down_per_client"] == 0
    stored = {n: local.client_state[n].clone() for n in trained}
    seen = {}
    step = local.local_step

    def capture(plan, s, rs, opt):
        if s == 0:
            seen.update({n: local.tensors[n].detach().clone() for n in trained})
        return step(plan, s, rs, opt)
    monkeypatch.setattr(local, "local_step", capture)
    local.run_round()
    for n in trained:
        for c, r in second.items():
            assert torch.equal(seen[n][r], stored[n][0, c]), (n, c)
    for n, v in local.global_state.items():
        assert torch.equal(v, initial[n]), n
    assert local.ledger.rounds[1]["up_per_client"] == 0


def test_local_lora_refuses_client_level_dp_and_server_optimizers():
    m = make_method({"name": "local_lora"}, LORA)
    assert "sends nothing" in m.client_dp_unsupported and "no aggregate" in m.server_optimizer_unsupported
    with pytest.raises(ValueError, match="unknown parameter"):
        make_method({"name": "local_lora", "share_head": True}, LORA)


def test_local_majority_predicts_each_clients_own_most_frequent_label():
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 1, 2, 2])
    # client 0 trains on 0,0,1 (majority 0) and holds out rows 6 (0) and 7 (1); client 1 trains on 1,1,2
    # (majority 1) and holds out 8, 9 (2, 2); client 2 trains on 2 and 5, a tie 1-vs-2 broken to the smaller id,
    # and holds out nothing
    fed = Federation(seed=0, lr=0.1, lora_alpha=8.0,
                     partitions=[np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([2, 5])],
                     personal_eval=[np.array([6, 7]), np.array([8, 9]), np.array([], dtype=int)])
    overall, each = personal_majority_accuracy(labels, [fed, fed])
    assert each == [[0.5, 0.0, None]] * 2 and overall == [0.25, 0.25]
    none = Federation(seed=0, lr=0.1, lora_alpha=8.0, partitions=[np.array([0, 1])],
                      personal_eval=[np.array([], dtype=int)])
    assert personal_majority_accuracy(labels, [none]) is None
