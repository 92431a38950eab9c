"""Unpadded execution of the frozen encoder: every token-wise op runs on the real tokens only.

A padded batch [N, T] of which only sum(lengths) tokens are real is packed into [total_tokens, H] rows
(ModernBERT / MosaicBERT "unpadding"). Embeddings, the Q/K/V/O and FFN linears (frozen or LoRA-stacked,
called as the model's own modules), LayerNorms and activations then compute exactly the real tokens;
only attention needs the sequences apart. It runs per group of similar lengths as a padded attention over
[n, heads, T_group, d] with a key mask (SDPA; on a CPU in bf16, two matmuls and an fp32 softmax, see
_attention): its FLOPs are a few percent of the linears' at T <= 128, and torch has no CPU varlen kernel
that is faster (nested-jagged SDPA falls back to the same math).
Padded query rows compute finite values that are never gathered back, so they carry no gradient.

The result equals the model's padded forward up to float summation order (tests/test_packed.py, 1e-5):
every per-sequence computation is the same and the backbone runs in eval mode (no dropout, no batch
statistics). One small function per architecture, registered by `config.model_type` (Opacus style);
a model without one runs padded (`supports_packed`).

Shapes: N sequences, L = total real tokens, T = longest sequence, H hidden size.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# Padded forward (a backbone without a packed one): a step's rows run as at most this many passes, grouped
# by length (each trimmed to its own longest row). More groups cut fewer padded tokens each while every
# pass pays a fixed cost (and the stacked layers' small per-replica part runs on every slot once per pass).
MAX_LENGTH_GROUPS = 4
# Packed forward: attention runs over at most this many groups of similar lengths (an SDPA call each);
# padding to one pass-wide longest row made it a quarter of MNLI's step time (T=128, mean length 40).
ATTENTION_GROUPS = 8


def length_groups(lengths, max_groups=MAX_LENGTH_GROUPS):
    """Split rows into at most `max_groups` groups of consecutive lengths so that the token slots computed,
    sum over groups of (rows x the group's longest length), are the fewest (exact dynamic programme over
    the sorted distinct lengths). Exact for the model: every sample's computation is its own (attention
    is masked per sequence; the backbone runs in eval mode, no batch statistics).

    lengths: [N] ints. Returns a list of index tensors into the N rows, shortest group first.
    """
    lengths = torch.as_tensor(lengths)
    values, counts = torch.unique(lengths, return_counts=True)        # sorted distinct lengths
    k, G = len(values), max(1, min(max_groups, len(values)))
    v, before = values.double().numpy(), np.concatenate([[0], np.cumsum(counts.numpy())])
    # best[g][j]: fewest slots covering distinct values 0..j with g + 1 groups; cut[g][j]: where the last starts
    best = np.full((G, k), np.inf)
    cut = np.zeros((G, k), dtype=np.int64)
    best[0] = before[1:] * v
    for g in range(1, G):
        for j in range(g, k):
            starts = np.arange(g, j + 1)                            # the last group covers starts..j
            cost = best[g - 1][starts - 1] + (before[j + 1] - before[starts]) * v[j]
            i = int(cost.argmin())
            best[g, j], cut[g, j] = cost[i], starts[i]
    g = int(best[:, k - 1].argmin())                                # fewer groups when they cost the same
    bounds, j = [], k - 1
    while g >= 0:
        i = int(cut[g, j]) if g > 0 else 0
        bounds.append((values[i], values[j]))
        j, g = i - 1, g - 1
    return [((lengths >= lo) & (lengths <= hi)).nonzero().squeeze(1) for lo, hi in reversed(bounds)]


@dataclass
class AttentionGroup:
    """Sequences of similar length whose tokens are the packed rows [start, stop): attention runs over them as
    [num_sequences, heads, max_len, d]; grid [stop - start] = local sequence * max_len + position; keys
    [num_sequences, max_len] marks the real keys (None: every sequence is max_len long)."""
    start: int
    stop: int
    num_sequences: int
    max_len: int
    grid: torch.Tensor
    keys: torch.Tensor | None


@dataclass
class PackedBatch:
    """The real tokens of a right-padded batch of N sequences, sequences in order of length (shortest first)
    so that each attention group is a contiguous range of rows. input_ids, token_type_ids, positions
    (0-based within the sequence), sequence (its row in the padded batch) [L]; lengths [N] (padded-batch
    order); max_len the longest."""
    input_ids: torch.Tensor
    token_type_ids: torch.Tensor | None
    positions: torch.Tensor
    sequence: torch.Tensor
    lengths: torch.Tensor
    max_len: int
    groups: list

    @property
    def num_sequences(self):
        return len(self.lengths)


def pack(input_ids, attention_mask, token_type_ids=None, max_groups=ATTENTION_GROUPS):
    """[N, T] right-padded inputs -> PackedBatch. Raises on left padding (positions would differ from the
    padded forward's) and on an empty sequence (its mean pooling is undefined)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    N, T = mask.shape
    if bool((lengths == 0).any()):
        raise ValueError("pack: a sequence has no real token")
    if not torch.equal(mask, torch.arange(T, device=mask.device)[None, :] < lengths[:, None]):
        raise ValueError("pack: the batch is not right-padded; a packed forward needs each row's real tokens first")
    order = torch.sort(lengths, stable=True).indices                # shortest first
    flat = mask[order].reshape(-1).nonzero().squeeze(1)             # real tokens, sorted-sequence-major
    row, positions = flat // T, flat % T
    sorted_lengths = lengths[order]
    ends = torch.cumsum(sorted_lengths, 0).tolist()
    groups = []
    for idx in length_groups(sorted_lengths.cpu(), max_groups):     # consecutive rows of the sorted order
        r0, r1 = int(idx[0]), int(idx[-1]) + 1
        start, stop = (ends[r0 - 1] if r0 else 0), ends[r1 - 1]
        T_g = int(sorted_lengths[r1 - 1])
        keys = torch.arange(T_g, device=mask.device)[None, :] < sorted_lengths[r0:r1, None]
        groups.append(AttentionGroup(start, stop, r1 - r0, T_g, (row[start:stop] - r0) * T_g + positions[start:stop],
                                     None if bool(keys.all()) else keys))
    return PackedBatch(input_ids=input_ids[order].reshape(-1)[flat],
                       token_type_ids=None if token_type_ids is None else token_type_ids[order].reshape(-1)[flat],
                       positions=positions, sequence=order[row], lengths=lengths, max_len=int(lengths.max()),
                       groups=groups)


@dataclass
class TokenLayout:
    """Where a pass's packed tokens sit for the stacked layers. Adapters compute in the replica grid
    [Rc, tokens_per_replica]: each replica's tokens in a row, padded only to the replica with the most
    (zeros: exactly zero gradient). Per-sample gradients are summed in the sample grid [Rc*b, T]: token i of
    row n at (its sample slot, i), T the longest row. replica_slots, sample_slots: [L] each token's index."""
    replica_slots: torch.Tensor
    sample_slots: torch.Tensor
    num_replicas: int
    tokens_per_replica: int
    batch_size: int
    max_len: int

    @classmethod
    def of(cls, batch, slots, num_slots, num_replicas):
        """batch: PackedBatch of the pass's rows; slots [N]: each row's slot among the Rc*b = num_slots."""
        slot = slots[batch.sequence]                                 # [L] each token's sample slot
        b = num_slots // num_replicas
        replica = slot // b
        counts = torch.bincount(replica, minlength=num_replicas)
        order = torch.sort(replica, stable=True).indices
        rank = torch.empty_like(order)                               # position among its replica's tokens
        rank[order] = torch.arange(len(order), device=slot.device) - (torch.cumsum(counts, 0) - counts)[replica[order]]
        per_replica = int(counts.max())
        return cls(replica * per_replica + rank, slot * batch.max_len + batch.positions, num_replicas, per_replica,
                   b, batch.max_len)

    def to_replica_grid(self, x):
        """[L, c] -> [Rc, tokens_per_replica, c]."""
        return x.new_zeros(self.num_replicas * self.tokens_per_replica, x.shape[-1]) \
            .index_copy(0, self.replica_slots, x).view(self.num_replicas, self.tokens_per_replica, -1)

    def from_replica_grid(self, y):
        """[Rc, tokens_per_replica, c] -> [L, c]."""
        return y.reshape(-1, y.shape[-1]).index_select(0, self.replica_slots)

    def per_sample(self, t):
        """[Rc, tokens_per_replica, c] -> [Rc, b, T, c], zeros beyond each sample's length."""
        c = t.shape[-1]
        return t.new_zeros(self.num_replicas * self.batch_size * self.max_len, c) \
            .index_copy(0, self.sample_slots, self.from_replica_grid(t)) \
            .view(self.num_replicas, self.batch_size, self.max_len, c)


def attend(q, k, v, batch, num_heads, bias=None):
    """Per-sequence softmax(q k^T / sqrt(d) + bias) v on packed rows, one SDPA per attention group.
    q, k, v: [L, H] -> [L, H]. bias: additive [1, heads, T, T] for T >= the longest sequence (MPNet's relative
    positions: its top-left block is the bias at any shorter length), or None."""
    H = q.shape[1]
    d = H // num_heads
    out = []
    for g in batch.groups:
        def grid(x):                                              # rows of g -> [n, heads, T_g, d], zeros elsewhere
            x = x[g.start:g.stop]
            return x.new_zeros(g.num_sequences * g.max_len, H).index_copy(0, g.grid, x) \
                .view(g.num_sequences, g.max_len, num_heads, d).transpose(1, 2)
        mask = None
        if g.keys is not None:
            mask = torch.zeros(g.num_sequences, 1, 1, g.max_len, device=q.device) \
                .masked_fill(~g.keys[:, None, None, :], torch.finfo(torch.float32).min)
        if bias is not None:
            block = bias[..., :g.max_len, :g.max_len].float()
            mask = block if mask is None else mask + block
        o = _attention(grid(q), grid(k), grid(v), mask)                # [n, heads, T_g, d]
        out.append(o.transpose(1, 2).reshape(-1, H).index_select(0, g.grid))
    return torch.cat(out)


def _attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v for q, k, v [n, heads, T, d] and an fp32 additive mask (or None).
    bf16 on a CPU: two matmuls and an fp32 softmax, because torch's CPU SDPA kernel in bf16 ran 2.4-6x slower
    than that (forward + backward, 12 heads of 32, T 32-128, AVX512-BF16) and slower than in fp32. Otherwise
    SDPA (fp32 on a CPU: 1.4-1.6x faster than the matmuls; flash / memory-efficient kernels on CUDA)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))


# ----------------------------------------------------------------------------- encoders, by model_type

PACKED_ENCODERS = {}


def register(*model_types):
    def wrap(fn):
        for t in model_types:
            PACKED_ENCODERS[t] = fn
        return fn
    return wrap


@register("bert")
def bert_encoder(encoder, batch):
    """transformers BertModel on packed tokens: last hidden states [L, H]."""
    emb = encoder.embeddings
    token_types = batch.token_type_ids if batch.token_type_ids is not None else torch.zeros_like(batch.input_ids)
    x = emb.word_embeddings(batch.input_ids) + emb.token_type_embeddings(token_types) \
        + emb.position_embeddings(batch.positions)
    x = emb.LayerNorm(x)
    heads = encoder.config.num_attention_heads
    for layer in encoder.encoder.layer:
        sa = layer.attention.self
        context = attend(sa.query(x), sa.key(x), sa.value(x), batch, heads)
        x = layer.attention.output(context, x)                    # dense, residual, LayerNorm: per token
        x = layer.output(layer.intermediate(x), x)
    return x


@register("mpnet")
def mpnet_encoder(encoder, batch):
    """transformers MPNetModel on packed tokens: last hidden states [L, H]. Positions start at padding_idx + 1
    (MPNet's convention); the relative-position bias is that of the padded forward at length T."""
    emb = encoder.embeddings
    x = emb.LayerNorm(emb.word_embeddings(batch.input_ids)
                      + emb.position_embeddings(batch.positions + emb.padding_idx + 1))
    T = batch.max_len
    bias = encoder.encoder.compute_position_bias(x.new_zeros(1, T, 1))     # [1, heads, T, T]
    heads = encoder.config.num_attention_heads
    for layer in encoder.encoder.layer:
        at = layer.attention.attn
        context = at.o(attend(at.q(x), at.k(x), at.v(x), batch, heads, bias=bias))
        x = layer.attention.LayerNorm(context + x)
        x = layer.output(layer.intermediate(x), x)
    return x


# ----------------------------------------------------------------------------- classifiers

def _parts(model):
    """(encoder, pooling) of a classifier a packed forward supports, else None."""
    from fedsim.models import MeanPoolingClassifier
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder.config, "model_type", None) not in PACKED_ENCODERS:
        return None
    if isinstance(model, MeanPoolingClassifier):
        return encoder, "mean"
    if type(model).__name__ in ("BertForSequenceClassification", "MPNetForSequenceClassification"):
        return encoder, "cls"
    return None


def supports_packed(model):
    return _parts(model) is not None


def packed_logits(model, batch):
    """Logits [N, labels] of a classifier (fedsim's MeanPoolingClassifier, or transformers' BERT/MPNet
    sequence classifier) from its packed forward."""
    encoder, pooling = _parts(model)
    hidden = PACKED_ENCODERS[encoder.config.model_type](encoder, batch)
    if pooling == "mean":                                          # masked mean per sequence
        pooled = hidden.new_zeros(batch.num_sequences, hidden.shape[1]).index_add_(0, batch.sequence, hidden)
        return model.classifier(pooled / batch.lengths[:, None].to(hidden.dtype))
    starts = (batch.positions == 0).nonzero().squeeze(1)           # each sequence's [CLS] / <s> row ...
    first = hidden[starts.new_empty(batch.num_sequences).index_copy_(0, batch.sequence[starts], starts)]  # [N, H]
    if encoder.config.model_type == "bert":                        # BERT: pooler (dense, tanh), then classifier
        return model.classifier(encoder.pooler(first[:, None, :]))
    return model.classifier(first[:, None, :])                     # MPNet's head reads features[:, 0]
