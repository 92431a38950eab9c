"""Every parameter of a transformers classifier stacked per replica: full fine-tuning through the same engine.

The container offers what the engine uses from StackedModel (num_replicas, state, tensors(), forward, heads,
lora, model.config). Canonical names are the HF model's named_parameters(), each stored as [R, *shape].
Gradients reach the GradBuffer through `_Tap`, an identity on the chunk's stacked tensors whose backward
hands the gradient over (and returns none, so nothing accumulates in .grad). Two ways to run a pass:

- packed tokens (summed gradients and evaluation, BERT-family backbones): fedsim.packed's forward on real
  tokens, with every Linear, LayerNorm and Embedding replaced by a replica module that computes each row
  with its own replica's weights: linears as one batched matmul over the replica grid [Rc, tokens, in]
  (fedsim.packed.TokenLayout; pooled rows [Rc, b, in]), LayerNorm and embeddings by gathering each row's
  replica's weights. Autograd sums each replica's gradient into its tapped [Rc, *shape] tensor.
- vmap (per-sample gradients under DP, and backbones without a packed forward): torch.func.functional_call
  under vmap over replicas on the padded rows. Per sample, each trainable tensor is expanded to
  [Rc, b, *shape] (a stride-0 view) and tapped; a second vmap over samples gives every sample its own copy,
  so the gradient arriving at the tap is the per-sample gradient [Rc, b, *shape]. Memory is that of the
  flat per-sample buffer, i.e. large for FFT. HF BERT's 2D attention-mask path uses data-dependent control
  flow that vmap cannot trace, so the mask is passed as a ready 4D additive mask (as fedsim.reference does).
  vmap has no batching rule for SDPA on the CPU and falls back to a slow loop: the packed pass avoids it.
The replica modules run the plain nn.Linear / LayerNorm / Embedding math outside a packed pass, on the
parameters functional_call substitutes, so both ways share one module tree.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fedsim.interface import Layout
from fedsim.packed import packed_logits, supports_packed
from fedsim.stacked import _StackedState, _set_module, head_module_names

# Backbones whose packed forward calls every parameter's module on token or pooled rows only. MPNet's
# relative-position bias is an Embedding looked up on a [T, T] bucket grid, once per pass: per replica it
# would need a bias per sequence, so MPNet full fine-tuning keeps the vmap pass.
PACKED_FULL_MODEL_TYPES = ("bert",)


@dataclass
class StackedHead:
    """View of one head Linear's stacked tensors (what init_head and the engine read)."""
    weight: torch.Tensor
    bias: torch.Tensor


class _Tap(torch.autograd.Function):
    """Identity on a stacked tensor; backward puts its gradient into the grad buffer under `name`.
    `anchor` (a scalar that requires grad) makes the output part of the graph; it gets no gradient."""

    @staticmethod
    def forward(ctx, anchor, p, name, state):
        ctx.name, ctx.state = name, state
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g):
        ctx.state.buffer.put(ctx.name, g)
        return None, None, None, None


def _additive_mask(attention_mask, dtype):
    """[..., T] 0/1 -> [..., 1, 1, T] additive mask (HF passes a ready 4D mask through unchanged)."""
    return torch.where(attention_mask.bool(), 0.0, torch.finfo(dtype).min).to(dtype)[..., None, None, :]


class _ReplicaRows:
    """What the replica modules of a packed pass read: the chunk's stacked tensors by canonical name
    (None outside a packed pass) and each row's replica, for token rows [L] and pooled rows [N]."""

    def __init__(self, state):
        self.state, self.params = state, None
        self.token_replica = self.row_replica = None

    def replica_of(self, rows):
        """[rows] replica index of each of x's rows: token rows if there are as many as tokens, else pooled rows
        (N < L unless every sequence is one token long, and then the token order is the row order)."""
        return self.token_replica if rows == len(self.token_replica) else self.row_replica

    def to_grid(self, x, num_replicas):
        """[rows, in] -> ([Rc, per_replica, in], inverse): the rows of each replica side by side (zeros elsewhere)."""
        st = self.state
        if x.shape[0] == len(self.token_replica):
            return st.tokens.to_replica_grid(x), st.tokens.from_replica_grid
        return st.pad(x).view(num_replicas, -1, x.shape[-1]), lambda y: st.unpad(y.reshape(-1, y.shape[-1]))


class ReplicaLinear(nn.Module):
    """nn.Linear whose weights are the row's replica's: y = x W_r^T + b_r, one batched matmul over replicas."""

    def __init__(self, base, name, rows):
        super().__init__()
        self.weight, self.bias, self.name, self.rows = base.weight, base.bias, name, rows

    def forward(self, x):
        p = self.rows.params
        if p is None:                                                # vmap pass: functional_call's weights
            return F.linear(x, self.weight, self.bias)
        W, bias = p[self.name + ".weight"], p.get(self.name + ".bias")
        flat = x.reshape(-1, x.shape[-1])
        grid, back = self.rows.to_grid(flat, W.shape[0])
        y = torch.bmm(grid, W.transpose(1, 2)) if bias is None else torch.baddbmm(bias[:, None, :], grid, W.transpose(1, 2))
        return back(y).view(*x.shape[:-1], W.shape[1])


class ReplicaLayerNorm(nn.Module):
    """nn.LayerNorm with the row's replica's affine weights: normalise, then x * w_r + b_r."""

    def __init__(self, base, name, rows):
        super().__init__()
        self.weight, self.bias, self.name, self.rows = base.weight, base.bias, name, rows
        self.normalized_shape, self.eps = base.normalized_shape, base.eps

    def forward(self, x):
        p = self.rows.params
        if p is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        flat = x.reshape(-1, x.shape[-1])
        rep = self.rows.replica_of(flat.shape[0])
        y = F.layer_norm(flat, self.normalized_shape, None, None, self.eps)
        # index_select: its backward (index_add) is deterministic on the CPU, W[rep]'s (index_put) is not: repeated runs differed by 1e-9
        y = y * p[self.name + ".weight"].index_select(0, rep) + p[self.name + ".bias"].index_select(0, rep)
        return y.view(x.shape)


class ReplicaEmbedding(nn.Module):
    """nn.Embedding looked up in the row's replica's table (the [Rc, V, H] tables as one [Rc * V, H] table).
    Rows of padding_idx get no gradient, as in nn.Embedding."""

    def __init__(self, base, name, rows):
        super().__init__()
        self.weight, self.padding_idx, self.name, self.rows = base.weight, base.padding_idx, name, rows
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            raise ValueError(f"{name}: max_norm, scale_grad_by_freq and sparse embeddings are not supported")

    def forward(self, ids):
        p = self.rows.params
        if p is None:
            return F.embedding(ids, self.weight, self.padding_idx)
        table = p[self.name + ".weight"]
        Rc, V, H = table.shape
        flat = ids.reshape(-1)
        y = F.embedding(flat + self.rows.replica_of(len(flat)) * V, table.reshape(Rc * V, H))
        if self.padding_idx is not None:
            y = torch.where((flat == self.padding_idx)[:, None], y.detach(), y)
        return y.view(*ids.shape, H)


REPLICA_MODULES = {nn.Linear: ReplicaLinear, nn.LayerNorm: ReplicaLayerNorm, nn.Embedding: ReplicaEmbedding}


def _replica_modules(model, rows):
    """Replace every module holding parameters by its replica module (same parameters, same names); False, and
    nothing replaced, if some parameter lives in a module of another kind."""
    owners = {n.rpartition(".")[0] for n, _ in model.named_parameters()}
    modules = {n: m for n, m in model.named_modules() if n in owners}
    if not all(type(m) in REPLICA_MODULES for m in modules.values()):
        return False
    for name, m in modules.items():
        _set_module(model, name, REPLICA_MODULES[type(m)](m, name, rows))
    return True


class FullStackedModel(nn.Module):
    """R replicas of a whole transformers classifier, all parameters stacked [R, ...].

    packed_tokens: summed-gradient passes and evaluation on real tokens only where the backbone allows
    (PACKED_FULL_MODEL_TYPES, a packed forward and only Linear / LayerNorm / Embedding parameters)."""

    def __init__(self, model, num_replicas, head="classifier", packed_tokens=True):
        super().__init__()
        model.requires_grad_(False)
        model.eval()                                                # no dropout: deterministic replicas
        self.model, self.num_replicas = model, num_replicas
        self.state = _StackedState()
        self.rows = _ReplicaRows(self.state)
        self.names = [n for n, _ in model.named_parameters()]
        # the HF model's own parameters are only a template (functional_call replaces every one of them)
        self.stack = nn.ParameterList([nn.Parameter(p.detach().expand(num_replicas, *p.shape).clone(),
                                                    requires_grad=False) for _, p in model.named_parameters()])
        self.lora = {}                             # no adapters: the engine's LoRA-scale setup has nothing to do
        self.head_names = head_module_names(model, head)
        if not self.head_names:
            raise ValueError(f"no nn.Linear named '{head}' in the model: set the head module name")
        self.packs = (packed_tokens and supports_packed(model)      # after the head lookup: it finds nn.Linear
                      and model.config.model_type in PACKED_FULL_MODEL_TYPES and _replica_modules(model, self.rows))

    @property
    def num_labels(self):
        """The classifier's label count (the model config's), as StackedModel.num_labels."""
        return int(self.model.config.num_labels)

    @property
    def runs_packed_tokens(self):
        """Packed for summed gradients and evaluation; per-sample gradients (DP) take the vmap pass."""
        buf = self.state.buffer
        return self.packs and (buf is None or not buf.per_sample)

    @property
    def heads(self):
        t = self.tensors()
        return {h: StackedHead(t[h + ".weight"], t.get(h + ".bias")) for h in self.head_names}

    def tensors(self):
        """Canonical name -> stacked tensor, in the HF model's named_parameters() order."""
        return dict(zip(self.names, self.stack))

    def layout(self, num_federations):
        """What a method may read (fedsim.interface.Layout): no adapters; every weight's replica-0 value."""
        return Layout(adapters={}, heads={h: (tuple(v.weight.shape[1:]), tuple(v.bias.shape[1:]))
                                          for h, v in self.heads.items()},
                      tensors={n: t[0] for n, t in self.tensors().items()}, rank=None, scales=None,
                      initializer_range=getattr(self.model.config, "initializer_range", 0.02))

    def apply(self, change, clients_per_round):
        """A fedsim.interface.Change on whole weights: nothing beyond the global state to carry out."""
        if change.rank is not None or change.scales is not None or change.sparse:
            raise ValueError("full fine-tuning has no LoRA rank, scales or sparse deltas to change")

    def forward_packed(self, batch):
        """Logits of a fedsim.packed.PackedBatch (the state's select_tokens must describe the same batch)."""
        st, rows = self.state, self.rows
        tensors = self.tensors()
        buf = st.buffer
        anchor = torch.zeros((), device=tensors[self.names[0]].device, requires_grad=True)
        params = {}
        for name, p in tensors.items():
            p = p[st.active].detach()
            params[name] = _Tap.apply(anchor, p, name, st) if buf is not None and name in buf.specs else p
        Rc = params[self.names[0]].shape[0]
        tokens = st.tokens
        rows.token_replica = tokens.replica_slots // tokens.tokens_per_replica
        slots = st.slots if st.slots is not None else torch.arange(batch.num_sequences, device=anchor.device)
        rows.row_replica = slots // (st.num_slots // Rc)
        rows.params = params
        try:
            return packed_logits(self.model, batch)
        finally:
            rows.params = rows.token_replica = rows.row_replica = None

    def forward(self, **batch):
        st = self.state
        tensors = self.tensors()
        Rc = tensors[self.names[0]][st.active].shape[0]
        # packed rows go back to the padded layout (vmap needs equal batches); empty slots are all-masked
        # zero rows whose logits are dropped by unpad, so they get exactly zero gradient
        inputs = {k: st.pad(v).reshape(Rc, -1, *v.shape[1:]) for k, v in batch.items()}   # replica-major rows
        dtype = tensors[self.names[0]].dtype
        if "attention_mask" in inputs:
            inputs["attention_mask"] = _additive_mask(inputs["attention_mask"], dtype)
        buf = st.buffer
        per_sample = buf is not None and buf.per_sample
        b = next(iter(inputs.values())).shape[1]
        anchor = torch.zeros((), device=tensors[self.names[0]].device, requires_grad=True)
        params, sample_dims = {}, {}
        for name, p in tensors.items():
            p = p[st.active].detach()
            train = buf is not None and name in buf.specs
            if train and per_sample:
                p = p[:, None].expand(Rc, b, *p.shape[1:])
            if train:
                p = _Tap.apply(anchor, p, name, st)
            params[name] = p
            sample_dims[name] = 0 if train and per_sample else None

        def run(p, x):
            return functional_call(self.model, p, args=(), kwargs=x).logits

        if per_sample:                      # one sample per call: add back its batch dim of 1
            def one(p, x):
                return run(p, {k: v[None] for k, v in x.items()})[0]
            logits = vmap(vmap(one, in_dims=(sample_dims, 0)))(params, inputs)
        else:
            logits = vmap(run)(params, inputs)
        return st.unpad(logits.reshape(-1, logits.shape[-1]))
