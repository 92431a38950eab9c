"""The stacked layer against an unmodified model + peft LoRA: forward, and exact per-sample gradients."""
import pytest
import torch

from fedsim.reference import ReferenceConfig, build_model, per_sample_grads
from fedsim.grads import GradBuffer
from fedsim.stacked import StackedModel


def random_batch(n=5, T=12, seed=0, labels=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, T), generator=g)
    am = torch.ones(n, T, dtype=torch.long)
    for i, L in enumerate([T, T - 4, 3, T - 1, 6][:n]):          # padded samples of several lengths
        am[i, L:] = 0
        ids[i, L:] = 0
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, labels, (n,), generator=g)}


def peft_and_stacked(make_model, targets, R, train_A=True, seed=0):
    """A peft model with non-zero B (so every gradient is non-trivial) and a StackedModel whose R replicas
    all hold the same adapter and head."""
    cfg = ReferenceConfig(rounds=1, local_steps=1, batch_size=1, lr=0.1, lora_r=4, lora_alpha=8.0,
                          target_modules=targets, train_A=train_A)
    peft_model, params, trainable = build_model(make_model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in params.items():
            if n.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    stacked = StackedModel(make_model(), R, 4, targets)
    assert list(stacked.tensors()) == list(params)              # canonical names and order agree
    with torch.no_grad():
        for n, t in stacked.tensors().items():
            t.copy_(params[n].detach().expand_as(t))
        for layer in stacked.lora.values():
            layer.scale.fill_(8.0 / 4)
    return peft_model, params, trainable, stacked


@pytest.mark.parametrize("targets", [("query", "value"), "all-linear"])
def test_replicas_forward_equals_peft(make_model, targets):
    peft_model, _, _, stacked = peft_and_stacked(make_model, targets, R=3)
    batch = random_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        got = stacked(**{k: v.repeat(3, 1) for k, v in inputs.items()}).view(3, len(expected), -1)
    for r in range(3):
        torch.testing.assert_close(got[r], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets,train_A", [(("query", "value"), True), ("all-linear", True), (("query", "value"), False)])
def test_per_sample_grads_equal_vmap_grad_on_peft(make_model, targets, train_A):
    """Per-sample gradients from the stacked layers' backward == torch.func.vmap(grad) on peft, per sample;
    padded tokens and masked (padding) samples contribute exactly zero.

    Compared in float64 at 1e-9: the claim is that the math is the same. (In float32 both sides round sums
    over every token differently, about 2.5e-6 of each gradient's norm with either pooling, measured; an
    element-wise atol would then depend on the gradients' scale, which mean pooling raises ~80x.)"""
    fp64 = lambda: make_model().to(torch.float64)  # noqa: E731
    peft_model, params, trainable, stacked = peft_and_stacked(fp64, targets, R=2, train_A=train_A)
    batch = random_batch()
    own = {id(p): n for n, p in peft_model.named_parameters()}
    expected = per_sample_grads(peft_model, {own[id(params[n])]: params[n] for n in trainable}, batch)
    expected = {n: expected[own[id(params[n])]] for n in trainable}

    tensors = stacked.tensors()
    for n, t in tensors.items():
        t.requires_grad_(n in trainable)
    b = len(batch["labels"])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)   # replica 1 has 2 padded samples
    st = stacked.state
    st.batch_size = b
    st.buffer = GradBuffer([(n, tuple(tensors[n].shape[1:])) for n in trainable], 2, b, True, "cpu", torch.float64)
    inputs = {k: v.repeat(2, 1) for k, v in batch.items() if k != "labels"}
    ce = torch.nn.functional.cross_entropy(stacked(**inputs), batch["labels"].repeat(2), reduction="none")
    (ce.view(2, b) * mask).sum().backward()
    buf, st.buffer = st.buffer, None
    assert set(buf.offsets) == set(trainable)
    if not train_A:
        assert not any(n.endswith("lora_A") for n in buf.offsets)
    for n in trainable:
        lo, hi = buf.offsets[n]
        got = buf.flat[:, :, lo:hi].view(2, b, *expected[n].shape[1:])
        torch.testing.assert_close(got[0], expected[n], rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(got[1][mask[1]], expected[n][mask[1]], rtol=1e-9, atol=1e-13)
        assert torch.count_nonzero(got[1][~mask[1]]) == 0               # masked samples: exactly zero
    torch.testing.assert_close(buf.sq_norms, buf.flat.pow(2).sum(-1), rtol=1e-5, atol=0)


def test_summed_grads_equal_peft_backward(make_model):
    peft_model, params, trainable, stacked = peft_and_stacked(make_model, ("query", "value"), R=1)
    batch = random_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.nn.functional.cross_entropy(peft_model(**inputs).logits, batch["labels"]).backward()
    tensors = stacked.tensors()
    for n, t in tensors.items():
        t.requires_grad_(n in trainable)
    stacked.state.buffer = GradBuffer([(n, tuple(tensors[n].shape[1:])) for n in trainable], 1, 5, False, "cpu")
    torch.nn.functional.cross_entropy(stacked(**inputs), batch["labels"]).backward()
    for n in trainable:
        torch.testing.assert_close(stacked.state.buffer.summed[n][0], params[n].grad, rtol=1e-5, atol=1e-8)
    assert all(t.grad is None for t in tensors.values())     # autograd never accumulates into the stacks


def test_bad_rank_and_targets(make_model):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        StackedModel(make_model(), 2, 0)
    with pytest.raises(ValueError, match="match no nn.Linear.*valid suffixes"):
        StackedModel(make_model(), 2, 4, ("query", "qkv_proj"))
