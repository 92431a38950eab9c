"""head_only: the frozen pretrained backbone with only the classification head trained, averaged and sent."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.engine import DPSetup
from fedsim.reference import run_reference
from fedsim.rng import torch_generator
from fedsim.sampling import fixed_batches, poisson_batches
from fedsim.stacked import StackedModel, _LoRADelta
from methods import make_method
from partitions import dirichlet_label_skew
from tests.helpers import assert_same, make_engine, reference_cfg, rel_err

QV = ["query", "value"]
SGD = {"name": "sgd", "lr": 0.5, "momentum": 0.0}
HEAD = ("classifier.weight", "classifier.bias")
LABELS, HIDDEN = 2, 384                              # SST-2 on MiniLM
HEAD_BYTES = (LABELS * HIDDEN + LABELS) * 4          # fp32 weight [2, 384] and bias [2]


def is_adapter(name):
    return name.endswith((".lora_A", ".lora_B"))


def snapshot(eng):
    return {k: v.clone() for k, v in eng.global_state.items()}


@pytest.mark.parametrize("private", [False, True], ids=["nodp", "dp"])
def test_head_only_trains_and_sends_the_head_alone(make_model, sst2_small, private, monkeypatch):
    """Two rounds, 2 of 4 clients each: every adapter tensor (global and every client's copy) is still its
    initial value, the head moved, each client sent and received exactly the head's bytes, and no backward ran
    through an adapter (so none through the encoder: nothing below the head needs a gradient)."""
    backwards = []
    original = _LoRADelta.backward
    counted = staticmethod(lambda ctx, g: backwards.append(1) or original(ctx, g))
    monkeypatch.setattr(_LoRADelta, "backward", counted)
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 4, alpha=0.5, seed=0)
    dp = DPSetup(max_grad_norm=0.5, sample_rate=0.1, max_batch=16) if private else None
    eng = make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer=SGD, targets=QV, fraction=0.5, K=2,
                      method="head_only", dp=dp, sigmas=[0.7] if private else None)
    init = snapshot(eng)
    assert eng.plan_round(0).trained == eng.plan_round(0).shared == list(HEAD)
    for _ in range(2):
        info = eng.run_round()
        assert all(x is not None for x in info["loss"]) and not info["failed"]
        for name, t in eng.tensors.items():
            if is_adapter(name):
                assert all(torch.equal(t[r], init[name][0]) for r in range(t.shape[0])), name
    for name, v in eng.global_state.items():
        if is_adapter(name):
            assert torch.equal(v, init[name]), name
    assert all(eng.global_state[n].abs().sum() == 0 for n in eng.global_state if n.endswith(".lora_B"))
    assert rel_err(eng.global_state["classifier.weight"], init["classifier.weight"]) > 1e-3
    assert not torch.equal(eng.global_state["classifier.bias"], init["classifier.bias"])
    for rnd in eng.ledger.rounds:
        assert rnd["up_per_client"] == rnd["down_per_client"] == HEAD_BYTES
        assert rnd["up"] == [2 * HEAD_BYTES]                        # 2 clients of the one federation
    assert backwards == []


def test_head_only_payload_is_the_head_of_every_lora_method(make_model):
    """The head's bytes, at any rank: FFA-LoRA's upload less its B, FedAvg-LoRA's less A and B."""
    stacked = StackedModel(make_model(), 1, 4, QV)
    lora = {"rank": 4, "alpha": 8.0, "targets": QV}
    round0 = SimpleNamespace(round=0)
    sizes = {}
    for name in ("head_only", "ffa_lora", "fedavg_lora"):
        method = make_method({"name": name}, lora)
        state = method.init_global(stacked.layout(1), [0]).global_state
        sizes[name] = method.payload_bytes(state, round0)
    adapter = lambda suffix: sum(t[0].numel() * 4 for n, t in state.items() if n.endswith(suffix))  # noqa: E731
    assert sizes["head_only"] == (HEAD_BYTES, HEAD_BYTES)
    assert sizes["ffa_lora"][0] - adapter(".lora_B") == HEAD_BYTES
    assert sizes["fedavg_lora"][0] - adapter(".lora_B") - adapter(".lora_A") == HEAD_BYTES
    with pytest.raises(ValueError, match="unknown parameter"):
        make_method({"name": "head_only", "train_head": True}, lora)


def test_head_only_equals_the_sequential_reference(make_model, sst2_small):
    """The peft reference with A = 0 is exactly head-only training: B's gradient (x A^T)^T g is then 0, so B
    stays 0 and the model is the frozen backbone plus the head; four clients, two of them per round,
    FedAvg-weighted, two rounds."""
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 4, alpha=0.5, seed=0)
    eng = make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer=SGD, targets=QV, fraction=0.5, K=2,
                      method="head_only")
    init = {k: v[0].clone() for k, v in eng.global_state.items()}
    for _ in range(2):
        eng.run_round()
    start = {k: torch.zeros_like(v) if k.endswith(".lora_A") else v for k, v in init.items()}
    ref, _ = run_reference(make_model, sst2_small, parts, start, reference_cfg(SGD, QV, 0.5, K=2, train_A=False))
    assert all(ref[k].abs().sum() == 0 for k in ref if k.endswith(".lora_B"))
    assert_same({k: eng.global_state[k][0] for k in HEAD}, ref)


def pooled_features(make_model, data, rows):
    """The frozen backbone's mean-pooled features [n, H] of dataset rows: the head's input."""
    model, seen = make_model(), []
    model.classifier.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        model(input_ids=data["input_ids"][rows], attention_mask=data["attention_mask"][rows],
              **({"token_type_ids": data["token_type_ids"][rows]} if "token_type_ids" in data else {}))
    return seen[0]


@pytest.mark.parametrize("private", [False, True], ids=["nodp", "dp"])
def test_head_only_is_a_plain_linear_head_on_frozen_features(make_model, sst2_small, private):
    """One client, one local step, written out in plain torch: logits = z W^T + b on the mean-pooled frozen
    features z. Non-private: W -= lr * grad of the batch's mean cross-entropy. DP: each sample's head gradient
    [(p - y) z^T, p - y] clipped jointly to C, summed, plus sigma * C * the keyed standard-normal draw over the
    head's coordinates only, divided by the expected batch q * n."""
    n, b, seed = 16, 8, 0
    part = np.arange(40, 40 + n)
    q, C, sigma = 0.5, 0.3, 0.8
    dp = DPSetup(max_grad_norm=C, sample_rate=q, max_batch=n) if private else None
    eng = make_engine(make_model, sst2_small, [[part]], seeds=[seed], optimizer=SGD, targets=QV, fraction=1.0,
                      K=1, b=b, method="head_only", dp=dp, sigmas=[sigma] if private else None)
    W, bias = (eng.global_state[k][0].clone() for k in HEAD)
    eng.run_round()
    if private:
        pos, mask = poisson_batches(n, q, n, 1, seed, 0, 0)
        rows = part[pos[0][mask[0]]]
    else:
        rows = part[fixed_batches(n, b, 1, seed, 0, 0)[0]]
    z, y = pooled_features(make_model, sst2_small, torch.as_tensor(rows)), sst2_small["labels"][rows]
    err = F.softmax(z @ W.T + bias, dim=1) - F.one_hot(y, LABELS).float()        # dCE/dlogits per sample
    per_sample = torch.cat([(err[:, :, None] * z[:, None, :]).flatten(1), err], 1)  # [m, labels*H + labels]
    if private:
        factor = (C / (per_sample.norm(dim=1) + 1e-6)).clamp(max=1.0)
        noise = torch.randn(per_sample.shape[1], generator=torch_generator(seed, "noise", 0, 0, 0))
        grad = ((factor[:, None] * per_sample).sum(0) + sigma * C * noise) / (q * n)
        assert (factor < 1).any()                                                # the clip binds
    else:
        grad = per_sample.mean(0)
    want = torch.cat([W.flatten(), bias]) - SGD["lr"] * grad
    got = torch.cat([eng.global_state[k][0].flatten() for k in HEAD])
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, torch.cat([W.flatten(), bias])) > 1e-3                  # it moved
