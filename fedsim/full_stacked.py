"""Every parameter of a transformers classifier stacked per replica: full fine-tuning through the same engine.

The container offers what the engine uses from StackedModel (num_replicas, state, tensors(), forward, heads,
lora, model.config). Canonical names are the HF model's named_parameters(), each stored as [R, *shape].
A pass runs the active replica chunk with torch.func.functional_call under vmap over replicas. Gradients
reach the GradBuffer through `_Tap`, an identity whose backward hands the gradient over (and returns none,
so nothing accumulates in .grad):
  - summed: the chunk's trainable tensors [Rc, *shape] are tapped; vmap over replicas.
  - per sample (DP): each trainable tensor is expanded to [Rc, b, *shape] (a stride-0 view) and tapped; a
    second vmap over samples gives every sample its own copy, so the gradient arriving at the tap is the
    per-sample gradient [Rc, b, *shape]. Memory is that of the flat per-sample buffer, i.e. large for FFT.
HF BERT's 2D attention-mask path uses data-dependent control flow that vmap cannot trace, so the mask is
passed as a ready 4D additive mask (as fedsim.reference does).
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedsim.stacked import _StackedState, head_module_names


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


class FullStackedModel(nn.Module):
    """R replicas of a whole transformers classifier, all parameters stacked [R, ...]."""

    def __init__(self, model, num_replicas, head="classifier"):
        super().__init__()
        model.requires_grad_(False)
        model.eval()                                                # no dropout: deterministic replicas
        self.model, self.num_replicas = model, num_replicas
        self.state = _StackedState()
        self.names = [n for n, _ in model.named_parameters()]
        # the HF model's own parameters are only a template (functional_call replaces every one of them)
        self.stack = nn.ParameterList([nn.Parameter(p.detach().expand(num_replicas, *p.shape).clone(),
                                                    requires_grad=False) for _, p in model.named_parameters()])
        self.lora = {}                             # no adapters: the engine's LoRA-scale setup has nothing to do
        self.head_names = head_module_names(model, head)
        if not self.head_names:
            raise ValueError(f"no nn.Linear named '{head}' in the model: set the head module name")

    @property
    def heads(self):
        t = self.tensors()
        return {h: StackedHead(t[h + ".weight"], t.get(h + ".bias")) for h in self.head_names}

    def tensors(self):
        """Canonical name -> stacked tensor, in the HF model's named_parameters() order."""
        return dict(zip(self.names, self.stack))

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
