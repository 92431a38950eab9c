"""The backbone of fedsim's credibility: the batched engine equals a plain sequential peft loop."""
import pytest
import torch

from fedsim.dp import max_poisson_batch
from fedsim.engine import DPSetup
from fedsim.reference import run_reference
from partitions import dirichlet_label_skew
from tests.helpers import assert_same, make_engine, reference_cfg


# AdamW divides every coordinate by its own running RMS, so a coordinate whose gradient is ~1e-7 of the
# tensor's norm (common for B at init) moves by O(lr) whatever its rounding: the ~1e-8 relative rounding
# that differs between one batched GEMM over R replicas and R separate GEMMs becomes ~1e-5 in fp32 after
# a few steps (measured: 1.5e-5, with the gradients themselves equal to 2e-8). The AdamW cases therefore
# compare the same math in fp64, where that rounding is ~1e-16; SGD cases are compared in fp32.
CASES = [
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, ["query", "value"], 0.5, torch.float32),
    ({"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}, ["query", "value"], 0.5, torch.float64),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.01}, "all-linear", 1.0, torch.float32),
    ({"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}, "all-linear", 0.75, torch.float64),
]


@pytest.mark.parametrize("optimizer,targets,fraction,dtype", CASES)
def test_engine_equals_sequential_peft_reference(make_model, sst2_small, optimizer, targets, fraction, dtype):
    labels = sst2_small["labels"].numpy()
    parts = dirichlet_label_skew(labels, 4, alpha=0.5, seed=0)
    fresh = make_model
    make_model = lambda: fresh().to(dtype)  # noqa: E731
    eng = make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer=optimizer, targets=targets,
                       fraction=fraction)
    init = {k: v[0].clone() for k, v in eng.global_state.items()}
    for _ in range(2):
        eng.run_round()
    ref, _ = run_reference(make_model, sst2_small, parts, init, reference_cfg(optimizer, targets, fraction))
    assert_same({k: v[0] for k, v in eng.global_state.items()}, ref)
    # and training did move the adapter (the comparison is not between two untouched states)
    assert all(eng.global_state[k][0].norm() > 0 for k in init if k.endswith("lora_B"))
    assert not torch.equal(eng.global_state["classifier.weight"][0], init["classifier.weight"])


def test_federations_and_chunks_share_one_pass(make_model, sst2_small):
    """Two federations (different seeds, partitions and learning rates) in one pass, run in chunks of one
    replica, each equal the reference run of that federation alone."""
    labels = sst2_small["labels"].numpy()
    parts = [dirichlet_label_skew(labels, 3, alpha=1.0, seed=s) for s in (5, 6)]
    opt = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    eng = make_engine(make_model, sst2_small, parts, seeds=[5, 6], optimizer=opt, targets=["query", "value"],
                       fraction=2 / 3, chunk=1, lrs=[0.1, 0.03])
    init = {k: v.clone() for k, v in eng.global_state.items()}
    for _ in range(2):
        eng.run_round()
    for f, (seed, lr) in enumerate([(5, 0.1), (6, 0.03)]):
        cfg = reference_cfg(dict(opt, lr=lr), ["query", "value"], 2 / 3, seed=seed)
        ref, _ = run_reference(make_model, sst2_small, parts[f], {k: v[f] for k, v in init.items()}, cfg)
        assert_same({k: v[f] for k, v in eng.global_state.items()}, ref)


@pytest.mark.parametrize("head_share", [None, 0.2])
def test_private_engine_equals_private_reference(make_model, sst2_small, head_share):
    """DP-SGD: per-sample clipping (flat over all trainable tensors, or per group: head and adapters each
    to their share of C) and the same seeded noise streams."""
    labels = sst2_small["labels"].numpy()
    parts = dirichlet_label_skew(labels, 3, alpha=0.5, seed=1)
    q, sigma, C = 0.05, 0.7, 0.5
    max_batch = max_poisson_batch(q * max(map(len, parts)))
    opt = {"name": "sgd", "lr": 0.5, "momentum": 0.0}
    eng = make_engine(make_model, sst2_small, [parts], seeds=[1], optimizer=opt, targets=["query", "value"],
                       fraction=1.0, dp=DPSetup(max_grad_norm=C, sample_rate=q, max_batch=max_batch,
                                                head_share=head_share), sigmas=[sigma])
    init = {k: v[0].clone() for k, v in eng.global_state.items()}
    for _ in range(2):
        eng.run_round()
    cfg = reference_cfg(opt, ["query", "value"], 1.0, seed=1, dp_max_grad_norm=C, dp_noise_multiplier=sigma,
                        dp_sample_rate=q, dp_max_batch=max_batch, dp_head_share=head_share)
    ref, _ = run_reference(make_model, sst2_small, parts, init, cfg)
    assert_same({k: v[0] for k, v in eng.global_state.items()}, ref)
