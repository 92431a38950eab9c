"""The packed (unpadded) forward equals the model's own padded forward, for every supported backbone."""
import pytest
import torch

from fedsim.packed import pack, packed_logits, supports_packed

LENGTHS = [3, 20, 7, 1, 12, 9]


def ragged_batch(vocab, token_types=True, pad_id=0):
    """Right-padded [6, 20] ids of the LENGTHS above, every row's real tokens random."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor(LENGTHS)
    mask = (torch.arange(20)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, vocab, (len(LENGTHS), 20), generator=gen).masked_fill(mask == 0, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = (torch.arange(20)[None, :] >= (lengths[:, None] // 2)).long() * mask
    return batch


def tiny_mpnet(pooling):
    from transformers import MPNetConfig, MPNetForSequenceClassification, MPNetModel
    from fedsim.models import MeanPoolingClassifier, init_head
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=3000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, num_labels=3)
    if pooling == "mean":
        model = MeanPoolingClassifier(MPNetModel(cfg, add_pooling_layer=False), 3)
    else:
        model = MPNetForSequenceClassification(cfg)
    init_head(model, [n for n, _ in model.named_parameters() if n.startswith("classifier.")], seed=1)
    return model.eval()


@pytest.mark.parametrize("backbone,pooling", [("minilm", "mean"), ("minilm", "cls"), ("mpnet", "mean"),
                                              ("mpnet", "cls")])
def test_packed_logits_equal_padded_forward(make_model, backbone, pooling):
    """MiniLM (BERT, real weights, token types that vary within a row) and a random 2-layer MPNet (relative
    position bias, positions from padding_idx + 1): logits within 1e-5 of transformers' forward, each
    row's own (a change in one row leaves the others' logits as they were)."""
    if backbone == "minilm":
        model, batch = make_model(num_labels=3, layers=2, pooling=pooling), ragged_batch(30000)
    else:
        model, batch = tiny_mpnet(pooling), ragged_batch(3000, token_types=False, pad_id=1)
    with torch.no_grad():                   # a head 100x its init scale: rows' logits differ well above atol
        for name, p in model.named_parameters():
            if name.startswith("classifier."):
                p.mul_(100.0)
    assert supports_packed(model)
    packed = pack(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    assert packed.input_ids.shape == (sum(LENGTHS),) and packed.max_len == max(LENGTHS)
    assert len(packed.groups) > 1 and packed.groups[0].keys is None   # several attention groups, some unpadded
    with torch.no_grad():
        want = model(**batch).logits
        got = packed_logits(model, packed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert want.std(0).max() > 1e-3                          # rows differ: the comparison is not vacuous
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][1, 5] += 1
        again = packed_logits(model, pack(changed["input_ids"], changed["attention_mask"],
                                          changed.get("token_type_ids")))
    assert not torch.equal(again[1], got[1])
    torch.testing.assert_close(again[[0, 2, 3, 4, 5]], got[[0, 2, 3, 4, 5]], rtol=0, atol=0)


def test_packed_gradients_equal_padded_gradients(make_model):
    """Backward through the packed forward: the input-side gradient reaching a frozen layer's weight equals
    the padded forward's (what LoRA's per-sample gradients are built from)."""
    batch = ragged_batch(30000)
    grads = []
    for packed in (False, True):
        model = make_model(num_labels=2, layers=2)
        weight = model.bert.encoder.layer[0].attention.self.value.weight
        weight.requires_grad_(True)
        if packed:
            logits = packed_logits(model, pack(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
        else:
            logits = model(**batch).logits
        logits.pow(2).sum().backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().max() > 0


def test_pack_refuses_left_padding_and_empty_rows():
    ids = torch.tensor([[0, 5, 6], [7, 8, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        pack(ids, torch.tensor([[0, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="no real token"):
        pack(ids, torch.tensor([[0, 0, 0], [1, 1, 0]]))


def test_models_without_a_packed_forward_are_reported():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2,
                                                                 hidden_dim=64))
    assert not supports_packed(model)


def test_bf16_attention_on_cpu_equals_sdpa_within_bf16_rounding():
    """attend's bf16 CPU branch (two matmuls, fp32 softmax) computes what SDPA does in fp32 on the same bf16
    inputs, masked keys and gradients included; an error in scale or mask would be O(1)."""
    from fedsim.packed import _attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 8, generator=g) for _ in range(3))
    mask = torch.zeros(3, 1, 1, 9).masked_fill(torch.arange(9) >= torch.tensor([9, 5, 2])[:, None, None, None],
                                               torch.finfo(torch.float32).min)
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = _attention(q16, k16, v16, mask)
    assert out.dtype == torch.bfloat16
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q16, k16, v16))
    ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    weights = torch.randn(ref.shape, generator=g)
    (out.float() * weights).sum().backward()
    (ref * weights).sum().backward()
    for a, b in ((q16, q32), (k16, k32), (v16, v32)):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_label_count_is_the_models_not_the_first_head_layers_width(pooling):
    """MPNet's [CLS] head is two layers (classifier.dense: hidden -> hidden, then out_proj: hidden -> labels). The
    divergence rule (loss above 100 x the loss of uniform guessing, 100 ln(labels)) must read 3 labels, not the
    dense layer's 64 outputs."""
    import math

    from fedsim.engine import DIVERGED_LOSS_FACTOR, diverged_loss
    from fedsim.stacked import StackedModel
    stacked = StackedModel(tiny_mpnet(pooling), num_replicas=2, rank=2, targets=["q", "v"])
    widths = [h.weight.shape[1] for h in stacked.heads.values()]
    assert widths == ([3] if pooling == "mean" else [64, 3])          # the first head layer is hidden-wide
    assert stacked.num_labels == 3
    assert diverged_loss(stacked) == pytest.approx(DIVERGED_LOSS_FACTOR * math.log(3))
