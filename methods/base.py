"""The method interface (Flower-strategy style): a method says only what differs.

The engine calls these hooks and never branches on a method's name. Global state is a dict
canonical-name -> tensor [F, *shape] (one row per federation); client states handed to `aggregate`
are [F, m, *shape] (m sampled clients per federation) with weights [F, m] summing to 1 per row.
"""
import math
import typing
from dataclasses import dataclass, fields

import torch


@dataclass
class LoRAParams:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("query", "value")


class Method:
    name = "base"
    Params = None            # a dataclass of the method's own config keys

    def __init__(self, lora: LoRAParams, **params):
        valid = [f.name for f in fields(self.Params)] if self.Params else []
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for method '{self.name}'; valid: {valid}")
        if self.Params:
            _check_types(self.name, self.Params, params)
        self.lora = lora
        self.params = self.Params(**params) if self.Params else None

    # --- initialisation and trainable set ---------------------------------------------------------
    def init_global(self, stacked, seeds):
        """Initial global state {name: [F, *shape]} for federations with the given seeds."""
        raise NotImplementedError

    def trainable(self, name, round_idx):
        """Is this tensor trained (and so clipped, noised, uploaded) by clients in this round?"""
        raise NotImplementedError

    # --- hooks with defaults ----------------------------------------------------------------------
    def build_stacked(self, model, num_replicas, packed_tokens=True):
        """The replica container the engine trains (default: stacked LoRA layers + head, frozen backbone).
        packed_tokens=False: the padded forward even where the backbone has a packed one (tests compare them)."""
        from fedsim.stacked import StackedModel
        return StackedModel(model, num_replicas, self.lora.rank, self.lora.targets, packed_tokens=packed_tokens)

    def state_dict(self):
        """Server-side method state beyond the global tensors (schedules), for checkpoints."""
        return {}

    def load_state_dict(self, d):
        pass

    def on_round_start(self, round_idx, global_state, stacked):
        """Schedules (stage switches, rank budgets): may return a new global state."""
        return global_state

    def extra_grad(self, name, local, global_bcast, round_idx):
        """Gradient of a data-independent local loss term (added after clipping/noise), or None.
        local: the replicas' tensor [Rc, *shape]; global_bcast(): their federations' global tensor [Rc, *shape]."""
        return None

    def aggregate(self, global_state, client_states, weights, round_idx):
        """FedAvg of every trained tensor, weighted by client sample counts."""
        new = dict(global_state)
        for name, stack in client_states.items():
            new[name] = torch.einsum("fm,fm...->f...", weights.to(stack.dtype), stack)
        return new

    def payload_bytes(self, global_state, round_idx):
        """(upload, download) bytes per participating client this round: the exact tensors sent."""
        up = sum(t[0].numel() * t.element_size() for n, t in global_state.items() if self.trainable(n, round_idx))
        down = sum(t[0].numel() * t.element_size() for t in global_state.values())
        return up, down


def _check_types(method, params_cls, given):
    """Each given parameter must have its field's declared type (an int is accepted for a float)."""
    hints = typing.get_type_hints(params_cls)
    for name, value in given.items():
        allowed = typing.get_args(hints[name]) or (hints[name],)        # int | None -> (int, NoneType)
        ok = any(value is None if t is type(None) else
                 isinstance(value, t) and not (isinstance(value, bool) and t is not bool) or
                 (t is float and isinstance(value, int) and not isinstance(value, bool)) for t in allowed)
        if not ok:
            want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"method {method} parameter {name} must be {want}, got {value!r} "
                             f"({type(value).__name__})")


def kaiming_uniform_A(shape, generator):
    """peft's default LoRA A init (nn.init.kaiming_uniform_ with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def init_head(stacked, seeds, std):
    """Fresh head per federation: weight ~ N(0, std) (transformers' BERT init), bias 0."""
    from fedsim.rng import torch_generator
    out = {}
    for name, layer in stacked.heads.items():
        shape = layer.weight.shape[1:]
        out[name + ".weight"] = torch.stack(
            [torch.randn(shape, generator=torch_generator(s, "head", name)) * std for s in seeds])
        out[name + ".bias"] = torch.zeros(len(seeds), layer.bias.shape[1])
    return out
