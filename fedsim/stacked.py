"""Stacked (replica-major) trainable layers injected into a frozen transformers model.

R replicas (virtual clients) share one frozen backbone. Every trainable tensor has R first:
LoRA A [R, r, in], B [R, out, r]; head weight [R, out, in], bias [R, out]. A step's batch is
replica-major ([Rc*b, T] rows, each replica's b samples contiguous), so the adapter path is two
batched matmuls over [Rc, b*T, in]. `active` selects the chunk of replicas [r0, r1) a pass runs.
A LoRA layer may also carry a per-replica sparse delta on its frozen base weight (SLoRA's stage 1):
values [R, nnz] at positions (rows, cols) shared by all replicas, applied by gather/index_add; and a dense
per-replica `folded` delta [R, out, in] that nobody trains (updates FedEx-LoRA and FLoRA fold into the frozen
weight, each federation its own), applied as one more batched matmul. A container built with train_folded
differentiates it while it requires grad (SA-FedLoRA's full initiating stage trains it as a dense delta on every
target weight, dW_r = sum_t g_t x_t^T like the head's weight); otherwise marking it trained is a loud error.

Gradients of the trainable tensors never go through autograd's parameter accumulation: each layer's
backward computes them itself -- summed per replica, or per sample when DP needs them -- as one
einsum-like batched matmul (Opacus grad-sampler style) and hands them to a GradBuffer (fedsim/grads.py).
"""
import re

import torch
from torch import nn

from fedsim.interface import Layout
from fedsim.packed import TokenLayout, packed_logits, supports_packed


class _StackedState:
    """Shared by all stacked layers of one model: the active replica chunk, the grad buffer, batch size,
    and the packing of a ragged batch. The engine sets the first three together (begin_pass / end_pass).

    A pass normally runs Rc*b replica-major rows. When replicas hold fewer real samples than b (Poisson
    batches), the pass runs only the N real rows ("packed"): the frozen backbone, the bulk of the compute,
    never sees a padding slot. `slots` [N] gives each packed row's position among the Rc*b replica-major
    slots; stacked layers `pad` their input to that layout for the per-replica part (zeros in empty
    slots, so those contribute exactly zero gradient) and `unpad` its output back. `select` sets the rows of
    a pass directly (one length group of the packed rows); backward reads only batch_size then, so a step
    may run several passes and call backward once. Packed tokens (select_tokens) run a step as one pass
    whose backward reads the token layout: it must come before the next select.
    """

    def __init__(self):
        self.active = slice(None)
        self.buffer = None
        self.batch_size = None
        self.slots = None
        self.num_slots = None
        self.tokens = None          # packed tokens: a fedsim.packed.TokenLayout (select_tokens)

    def begin_pass(self, active, batch_size=None, buffer=None):
        """Start a step's passes (or an evaluation's): the replica chunk `active`, rows per replica (the
        per-sample gradient layout), where gradients go (a GradBuffer; None when nothing is trained), every row
        selected. The one way the engine sets up the layers; select / pack / select_tokens then pick rows."""
        self.active, self.batch_size, self.buffer = active, batch_size, buffer
        self.slots = self.num_slots = self.tokens = None

    def end_pass(self):
        """Back to no pass; returns the pass's GradBuffer (None if it had none)."""
        buffer, self.buffer = self.buffer, None
        self.batch_size = self.slots = self.num_slots = self.tokens = None
        return buffer

    def pack(self, mask):
        """Run only the rows where mask [Rc, b] is True (None, all or none True: every row)."""
        self.tokens = None
        if mask is None or bool(mask.all()) or not bool(mask.any()):   # an empty pass would have no rows at all
            self.slots = self.num_slots = None
        else:
            self.slots, self.num_slots = mask.reshape(-1).nonzero().squeeze(1), mask.numel()

    def select(self, slots, num_slots):
        """The next pass runs the rows at `slots` [n] of the Rc*b = num_slots replica-major slots."""
        self.slots, self.num_slots = slots, num_slots
        self.tokens = None

    def pad(self, x):
        """Packed rows [N, ...] -> replica-major rows [Rc*b, ...], zeros in empty slots."""
        if self.slots is None:
            return x
        return x.new_zeros(self.num_slots, *x.shape[1:]).index_copy(0, self.slots, x)

    def unpad(self, y):
        """Replica-major rows [Rc*b, ...] -> the packed rows [N, ...]."""
        return y if self.slots is None else y.index_select(0, self.slots)

    def select_tokens(self, batch, num_replicas):
        """The next pass runs the selected rows as packed tokens (a fedsim.packed.PackedBatch of those rows, in
        order); its layers place them through a fedsim.packed.TokenLayout."""
        slots = self.slots if self.slots is not None else torch.arange(batch.num_sequences, device=batch.sequence.device)
        if self.num_slots is None:
            self.num_slots = batch.num_sequences
        self.tokens = TokenLayout.of(batch, slots, self.num_slots, num_replicas)

    def pad_tokens(self, x, num_replicas):
        """A LoRA layer's input -> [Rc, L, in]: packed tokens into the replica grid; padded rows [N, T, in]
        through `pad` into replica-major sample slots (L = b*T)."""
        if self.tokens is None:
            return self.pad(x).reshape(num_replicas, -1, x.shape[-1])
        return self.tokens.to_replica_grid(x)

    def unpad_tokens(self, y, like):
        """Inverse of pad_tokens for an output y [Rc, L, out]; `like`: the frozen layer's output."""
        if self.tokens is None:
            return self.unpad(y.reshape(-1, *like.shape[1:]))
        return self.tokens.from_replica_grid(y)

    def per_sample(self, t):
        """An adapter tensor [Rc, L, c] (the layout pad_tokens made) -> [Rc, b, T, c], each sample's tokens in
        its own row (zeros beyond its length): what per-sample gradient contractions sum over."""
        if self.tokens is None:
            return t.view(t.shape[0], self.batch_size, -1, t.shape[-1])
        return self.tokens.per_sample(t)


def _full_precision(forward):
    """Autocast off inside an adapter or head op on either device type: under bf16 autocast the frozen
    backbone's matmuls run in bf16, while adapters, the head and their (per-sample) gradients compute in
    their parameters' dtype (fp32). Backward needs no decorator: the engine calls it outside autocast."""
    for device_type in ("cuda", "cpu"):
        forward = torch.amp.custom_fwd(device_type=device_type, cast_inputs=torch.float32)(forward)
    return forward


class _LoRADelta(torch.autograd.Function):
    """delta = scale * (x A^T) B^T per replica; backward hands dA, dB to the layer's buffer."""

    @staticmethod
    @_full_precision
    def forward(ctx, x, A, B, scale, layer):
        u = torch.bmm(x, A.transpose(1, 2))                       # [Rc, N, r]
        ctx.save_for_backward(x, u, A, B, scale)
        ctx.layer = layer
        return torch.bmm(u, B.transpose(1, 2)) * scale[:, None, None]

    @staticmethod
    def backward(ctx, g):
        x, u, A, B, scale = ctx.saved_tensors
        layer = ctx.layer
        gs = g * scale[:, None, None]                               # [Rc, N, out]
        gB = torch.bmm(gs, B)                                       # [Rc, N, r] = scale * B^T g_t
        state = layer.state
        if state.buffer is not None:
            if state.buffer.per_sample:
                split = state.per_sample                                # [Rc, L, .] -> [Rc, b, T, .]
                if layer.B.requires_grad:   # dB_n = scale * sum_t g_t u_t^T
                    state.buffer.put(layer.name + ".lora_B", split(gs).transpose(2, 3) @ split(u))
                if layer.A.requires_grad:   # dA_n = scale * sum_t (B^T g_t) x_t^T
                    state.buffer.put(layer.name + ".lora_A", split(gB).transpose(2, 3) @ split(x))
            else:
                if layer.B.requires_grad:
                    state.buffer.put(layer.name + ".lora_B", gs.transpose(1, 2) @ u)
                if layer.A.requires_grad:
                    state.buffer.put(layer.name + ".lora_A", gB.transpose(1, 2) @ x)
        grad_x = torch.bmm(gB, A) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class _SparseDelta(torch.autograd.Function):
    """delta[..., rows[k]] += v[k] * x[..., cols[k]] per replica: a sparse [out, in] weight at shared positions,
    never densified. Backward hands dv_n = sum_t g[n, t, rows] * x[n, t, cols] (summed or per sample) to the
    buffer. The [Rc, N, nnz] gathered intermediate is the price of not materialising [Rc, out, in]."""

    @staticmethod
    @_full_precision
    def forward(ctx, x, v, rows, cols, layer):
        ctx.save_for_backward(x, v, rows, cols)
        ctx.layer = layer
        out = x.new_zeros(*x.shape[:2], layer.base.out_features)
        return out.index_add_(2, rows, x[:, :, cols] * v[:, None, :])

    @staticmethod
    def backward(ctx, g):
        x, v, rows, cols = ctx.saved_tensors
        layer = ctx.layer
        state = layer.state
        g_rows = g[:, :, rows]                                      # [Rc, N, nnz]
        if state.buffer is not None and layer.sparse.requires_grad:
            prod = g_rows * x[:, :, cols]
            if state.buffer.per_sample:
                state.buffer.put(layer.name + ".sparse", state.per_sample(prod).sum(2))
            else:
                state.buffer.put(layer.name + ".sparse", prod.sum(1))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x).index_add_(2, cols, g_rows * v[:, None, :])
        return grad_x, None, None, None, None


class _DenseDelta(torch.autograd.Function):
    """delta = x W_r^T per replica for a trained dense delta W [Rc, out, in] on the frozen weight (a `folded`
    delta of a train_folded layer that requires grad); backward hands dW_n = sum_t g_t x_t^T ([Rc, b, out, in]
    per sample, [Rc, out, in] summed) to the buffer as `<layer>.folded`, as _StackedAffine does for the head."""

    @staticmethod
    @_full_precision
    def forward(ctx, x, W, layer):
        ctx.save_for_backward(x, W)
        ctx.layer = layer
        return torch.bmm(x, W.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        layer = ctx.layer
        state = layer.state
        if state.buffer is not None:
            if state.buffer.per_sample:
                split = state.per_sample                                # [Rc, L, .] -> [Rc, b, T, .]
                state.buffer.put(layer.name + ".folded", split(g).transpose(2, 3) @ split(x))
            else:
                state.buffer.put(layer.name + ".folded", g.transpose(1, 2) @ x)
        grad_x = torch.bmm(g, W) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _folded_delta(x, folded):
    """x [Rc, L, in] @ folded^T per replica -> [Rc, L, out] in the adapters' precision, autocast off (x comes
    in that precision); plain autograd: folded is frozen, so only x gets a gradient."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.bmm(x, folded.transpose(1, 2))


class StackedLoRALinear(nn.Module):
    """A frozen nn.Linear shared by all replicas plus per-replica LoRA factors (peft's layout per replica)."""

    def __init__(self, base: nn.Linear, name: str, num_replicas: int, rank: int, state: _StackedState,
                 folded=False, train_folded=False):
        super().__init__()
        self.base, self.name, self.state, self.rank = base, name, state, rank
        self.train_folded = train_folded
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)   # fp32 unless the backbone is fp64
        self.A = nn.Parameter(torch.zeros(num_replicas, rank, base.in_features, **kw), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(num_replicas, base.out_features, rank, **kw), requires_grad=False)
        # folded: a dense per-replica delta on the frozen weight, never trained (gradients flow to x only), unless
        # train_folded: then while it requires grad, _DenseDelta hands dW to the buffer
        self.folded = nn.Parameter(torch.zeros(num_replicas, base.out_features, base.in_features, **kw),
                                   requires_grad=False) if folded else None
        self.register_buffer("scale", torch.ones(num_replicas, **kw))
        self.register_parameter("sparse", None)                     # optional sparse delta (set_sparse)
        self.register_buffer("sparse_rows", None)
        self.register_buffer("sparse_cols", None)

    def set_sparse(self, rows, cols):
        """Attach zero per-replica values at positions (rows, cols) of the base weight, shared by all replicas."""
        dev = self.A.device
        self.sparse = nn.Parameter(self.A.new_zeros(self.A.shape[0], len(rows)), requires_grad=False)
        self.sparse_rows, self.sparse_cols = rows.to(dev, torch.long), cols.to(dev, torch.long)

    def clear_sparse(self):
        self.sparse = self.sparse_rows = self.sparse_cols = None

    def forward(self, x):
        h = self.base(x)                                            # packed rows: no padding slot computed
        st = self.state
        A, B, scale = self.A[st.active], self.B[st.active], self.scale[st.active]
        R = A.shape[0]
        xr = st.pad_tokens(x.to(A.dtype), R)                         # [Rc, L, in], each replica's rows
        delta = _LoRADelta.apply(xr, A, B, scale, self)
        if self.sparse is not None:
            delta = delta + _SparseDelta.apply(xr, self.sparse[st.active], self.sparse_rows, self.sparse_cols, self)
        if self.folded is not None and self.train_folded and self.folded.requires_grad:
            delta = delta + _DenseDelta.apply(xr, self.folded[st.active], self)
        elif self.folded is not None:
            delta = delta + _folded_delta(xr, self.folded[st.active])
        return h + st.unpad_tokens(delta, h).to(h.dtype)


class _StackedAffine(torch.autograd.Function):
    """y = x W_r^T + b_r per replica; backward hands dW, db (summed or per sample) to the buffer."""

    @staticmethod
    @_full_precision
    def forward(ctx, x, W, bias, layer):
        ctx.save_for_backward(x, W)
        ctx.layer = layer
        return torch.baddbmm(bias[:, None, :], x, W.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        layer = ctx.layer
        state = layer.state
        if state.buffer is not None and layer.weight.requires_grad:
            if state.buffer.per_sample:
                R, N, _ = x.shape
                b = state.batch_size
                gs, xs = g.view(R, b, N // b, -1), x.view(R, b, N // b, -1)
                state.buffer.put(layer.name + ".weight", gs.transpose(2, 3) @ xs)
                state.buffer.put(layer.name + ".bias", gs.sum(2))
            else:
                state.buffer.put(layer.name + ".weight", g.transpose(1, 2) @ x)
                state.buffer.put(layer.name + ".bias", g.sum(1))
        grad_x = torch.bmm(g, W) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class StackedLinear(nn.Module):
    """A fully trainable per-replica nn.Linear (the classification head), initialised from `base`."""

    def __init__(self, base: nn.Linear, name: str, num_replicas: int, state: _StackedState):
        super().__init__()
        self.name, self.state = name, state
        self.weight = nn.Parameter(base.weight.detach().expand(num_replicas, -1, -1).clone(), requires_grad=False)
        bias = base.bias if base.bias is not None else torch.zeros(base.out_features)
        self.bias = nn.Parameter(bias.detach().expand(num_replicas, -1).clone(), requires_grad=False)

    def forward(self, x):
        st = self.state
        W, bias = self.weight[st.active], self.bias[st.active]
        R = W.shape[0]
        xr = st.pad(x.to(W.dtype)).reshape(R, -1, x.shape[-1])
        y = _StackedAffine.apply(xr, W, bias, self)
        return st.unpad(y.reshape(-1, *x.shape[1:-1], W.shape[1]))


def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def head_module_names(model, head="classifier"):
    """The nn.Linear modules of the classification head (BERT: `classifier`; RoBERTa/MPNet: dense, out_proj)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (n == head or n.startswith(head + "."))]


def target_module_names(model, targets, head="classifier"):
    """Names of the nn.Linear modules LoRA adapts. targets: list of name suffixes / regexes, or "all-linear"
    (every Linear except the head, as peft's "all-linear")."""
    heads = set(head_module_names(model, head))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads]
    if targets in ("all-linear", ["all-linear"]):
        return linears
    if isinstance(targets, str):
        targets = [targets]
    chosen, unmatched = [], []
    for t in targets:
        hits = [n for n in linears if n == t or n.endswith("." + t) or re.fullmatch(t, n)]
        (chosen.extend(hits) if hits else unmatched.append(t))
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"LoRA target module(s) {unmatched} match no nn.Linear of this model; "
                         f"valid suffixes: {suffixes} or 'all-linear'")
    return [n for n in linears if n in set(chosen)]           # model order = canonical order


class StackedModel(nn.Module):
    """A transformers classifier with stacked LoRA layers and a stacked head; base weights frozen, shared.

    packed_tokens: run the backbone on real tokens only (fedsim.packed) when it has a packed forward;
    False keeps the padded forward (the same numbers up to float summation order; tests compare the two).
    folded: a dense per-replica delta on every adapted weight; train_folded: the layers differentiate it while it
    requires grad (else it is frozen whatever a method marks trained)."""

    runs_packed_rows = True     # a pass computes only its selected rows (the engine may split a step by length)

    def __init__(self, model, num_replicas, rank, targets=("query", "value"), head="classifier", packed_tokens=True,
                 folded=False, train_folded=False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank}); set lora.rank to a positive integer")
        model.requires_grad_(False)
        model.eval()                                                # no dropout: deterministic replicas
        self.model, self.num_replicas, self.rank = model, num_replicas, rank
        self.state = _StackedState()
        self.lora = {}
        for name in target_module_names(model, list(targets) if not isinstance(targets, str) else targets, head):
            layer = StackedLoRALinear(model.get_submodule(name), name, num_replicas, rank, self.state, folded,
                                      train_folded)
            _set_module(model, name, layer)
            self.lora[name] = layer
        self.heads = {}
        for name in head_module_names(model, head):
            layer = StackedLinear(model.get_submodule(name), name, num_replicas, self.state)
            _set_module(model, name, layer)
            self.heads[name] = layer
        if not self.heads:
            raise ValueError(f"no nn.Linear named '{head}' in the model: set the head module name")
        # a pass computes only the real tokens of its rows where the backbone has a packed forward
        self.runs_packed_tokens = packed_tokens and supports_packed(model)

    @property
    def num_labels(self):
        """The classifier's label count (the model config's; a head of two layers, as RoBERTa's and MPNet's
        dense -> out_proj, is wider than that in its first)."""
        return int(self.model.config.num_labels)

    def resize_rank(self, rank):
        """New LoRA rank for every layer (zero-filled; the caller loads the values). Scale is kept."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        for layer in self.lora.values():
            R, _, n_in = layer.A.shape
            layer.A = nn.Parameter(layer.A.new_zeros(R, rank, n_in), requires_grad=False)
            layer.B = nn.Parameter(layer.B.new_zeros(R, layer.B.shape[1], rank), requires_grad=False)
            layer.rank = rank
        self.rank = rank

    def tensors(self):
        """Canonical name -> stacked tensor, in canonical order (per module folded and sparse if any, A, B; head
        last)."""
        out = {}
        for name, layer in self.lora.items():
            if layer.folded is not None:
                out[name + ".folded"] = layer.folded
            if layer.sparse is not None:
                out[name + ".sparse"] = layer.sparse
            out[name + ".lora_A"], out[name + ".lora_B"] = layer.A, layer.B
        for name, layer in self.heads.items():
            out[name + ".weight"], out[name + ".bias"] = layer.weight, layer.bias
        return out

    def layout(self, num_federations):
        """What a method may read (fedsim.interface.Layout): shapes, the rank, each federation's LoRA scale (replica
        f * clients_per_round starts federation f's block)."""
        scale = next(iter(self.lora.values())).scale if self.lora else None
        return Layout(adapters={n: tuple(layer.base.weight.shape) for n, layer in self.lora.items()},
                      heads={n: (tuple(h.weight.shape[1:]), tuple(h.bias.shape[1:])) for n, h in self.heads.items()},
                      tensors={n: t[0] for n, t in self.tensors().items()}, rank=self.rank,
                      scales=None if scale is None else scale.view(num_federations, -1)[:, 0].clone(),
                      initializer_range=getattr(self.model.config, "initializer_range", 0.02))

    def apply(self, change, clients_per_round):
        """Carry out a method's fedsim.interface.Change on the container: rank, scales, sparse deltas."""
        if change.rank is not None and change.rank != self.rank:
            self.resize_rank(change.rank)
        if change.scales is not None:
            for layer in self.lora.values():
                layer.scale.copy_(change.scales.to(layer.scale).repeat_interleave(clients_per_round))
        if change.sparse is not None:
            for name, layer in self.lora.items():
                if name not in change.sparse:
                    layer.clear_sparse()
                elif layer.sparse is None:
                    layer.set_sparse(*change.sparse[name])

    def forward(self, **batch):
        return self.model(**batch).logits

    def forward_packed(self, batch):
        """Logits of a fedsim.packed.PackedBatch (the state's select_tokens must describe the same batch)."""
        return packed_logits(self.model, batch)
