"""The interface the engine owns and methods implement (Flower's Strategy, owned by the framework).

The engine calls a `Method`'s hooks and never branches on a method's name; methods import this module,
never the reverse (tests/test_layering.py). Global state is a dict canonical-name -> tensor [F, *shape]
(one row per federation); client states handed to `aggregate` are [F, m, *shape] (m sampled clients per
federation) with weights [F, m] summing to 1 per row.

A method never touches the replica container: it names the container it needs (`Method.container`: a
`ContainerSpec`, which fedsim.containers builds), reads a `Layout` (shapes, rank, each federation's LoRA
scale) and its hooks return a `Change` (new global state, and a new rank, scales or sparse masks) that the
engine applies. Per tensor and round it says three things: do the clients train it (`trained`: gradients,
clipping and noise), send it to the server to aggregate (`shared`: the upload, and the download), and keep
their own copy between rounds (`client_local`: the engine stores it per client id, never averages it).
"""
import typing
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class ContainerSpec:
    """The replica container a method trains. kind "lora": the frozen backbone with stacked LoRA layers and
    heads (fedsim.stacked.StackedModel); "full": every weight stacked per replica (fedsim.full_stacked).
    folded: each LoRA layer also carries a dense delta dW [out, in] added to its frozen weight (FedEx-LoRA's
    residual, FLoRA's stacked product); train_folded: clients train that delta (SA-FedLoRA's full initiating
    stage)."""
    kind: str = "lora"
    folded: bool = False
    train_folded: bool = False


@dataclass
class LoRAParams:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("query", "value")


@dataclass(frozen=True)
class Layout:
    """What a method may know of the replica container. adapters: LoRA target -> (out, in) of its frozen
    weight; heads: head module -> (weight shape, bias shape); tensors: canonical name -> replica 0's value
    (a view: read, never write), in canonical order, e.g. the pretrained weights full fine-tuning starts
    from; rank: the current LoRA rank (None without adapters); scales [F]: each federation's LoRA scale at
    that rank (None without adapters); initializer_range: the backbone's init std."""
    adapters: dict
    heads: dict
    tensors: dict
    rank: int | None
    scales: torch.Tensor | None
    initializer_range: float


@dataclass
class Change:
    """What a hook asks the engine to do. global_state: the new global tensors {name: [F, *shape]}; rank: resize
    every adapter to this rank (values come from global_state); scales [F]: each federation's new LoRA scale;
    sparse: {target: (rows, cols)} gives each listed target a zero sparse delta at those positions of its frozen
    weight (kept if it has one) and drops the delta of every target not listed ({}: drops them all). None
    leaves a thing as it is."""
    global_state: dict
    rank: int | None = None
    scales: torch.Tensor | None = None
    sparse: dict | None = None


class Method:
    name = "base"
    Params = None            # a dataclass of the method's own config keys
    # Why client-level DP (fedsim.dp: clipped, noised average of the shared tensors' updates) would not protect
    # what this method's clients send, or None where it does.
    client_dp_unsupported = None
    # Why a server optimizer (fedsim/server_optimizers.py: a step on the aggregate's update of each shared
    # tensor) would not make sense for this method, or None where it does.
    server_optimizer_unsupported = None

    def __init__(self, lora: LoRAParams, **params):
        valid = [f.name for f in fields(self.Params)] if self.Params else []
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for method '{self.name}'; valid: {valid}")
        if self.Params:
            _check_types(self.name, self.Params, params)
        self.lora = lora
        self.params = self.Params(**params) if self.Params else None

    # --- initialisation and what each tensor is ---------------------------------------------------
    def init_global(self, layout, seeds):
        """Change holding the initial global state {name: [F, *shape]} of federations with these seeds."""
        raise NotImplementedError

    def trained(self, name, round_idx):
        """Do clients train this tensor in this round (gradients, clipping and noise under DP)?"""
        raise NotImplementedError

    def shared(self, name, round_idx):
        """Is this tensor sent to the server and aggregated this round (upload and download)? Default: what is
        trained and not client-local. Tensors nobody trains are re-derived from the seed, never sent."""
        return self.trained(name, round_idx) and not self.client_local(name, round_idx)

    def client_local(self, name, round_idx):
        """Does each client keep its own copy of this tensor between rounds? The engine stores it per client id
        (every client starts from the initial global value) and never aggregates it."""
        return False

    # --- hooks with defaults ----------------------------------------------------------------------
    def container(self):
        """The replica container the engine trains (default: stacked LoRA layers + head, frozen backbone)."""
        return ContainerSpec("lora")

    def state_dict(self):
        """Server-side method state beyond the global tensors (schedules), for checkpoints."""
        return {}

    def load_state_dict(self, d):
        pass

    def on_round_start(self, round_idx, global_state, layout):
        """Schedules (stage switches, rank budgets): a Change (default: nothing changes)."""
        return Change(global_state)

    def local_regularizer_grad(self, name, local, global_bcast, round_idx, client_ids, local_of):
        """Gradient of a data-independent local loss term or correction (added after clipping/noise), or None.
        local: the replicas' tensor [Rc, *shape]; global_bcast(): their federations' global tensor [Rc, *shape];
        client_ids: the replicas' (federation index, client id), Rc pairs; local_of(other): the replicas' current
        value of another trained tensor [Rc, *shape] (a term coupling two tensors, e.g. HetLoRA's pruning penalty)."""
        return None

    def local_step_correction(self, name, round_idx, client_ids):
        """A direction d [Rc, *shape] each client moves along after every optimizer step, tensor -= lr d (SCAFFOLD's
        drift correction), or None. Outside the optimizer, so an adaptive optimizer never rescales it; under DP it
        comes after clipping and noise."""
        return None

    def aggregate(self, global_state, client_states, weights, plan):
        """FedAvg of every shared tensor, weighted by client sample counts. plan: the round's
        fedsim.plan.RoundPlan (round, which client sent what, local steps, learning rates)."""
        new = dict(global_state)
        for name, stack in client_states.items():
            new[name] = torch.einsum("fm,fm...->f...", weights.to(stack.dtype), stack)
        return new

    def client_mask(self, name, shape, client_ids):
        """Which slots of tensor `name` (per replica shape `shape`) the clients client_ids hold: a 0/1 tensor
        [len(client_ids), *shape], or None for all. The engine zeroes the rest on receipt and in every gradient."""
        return None

    def payload_bytes(self, global_state, plan):
        """(upload, download) bytes per participating client this round: the shared tensors, each way. Each is
        one number (every client the same) or a list with one per replica (plan.client_ids order)."""
        up = sum(t[0].numel() * t.element_size() for n, t in global_state.items() if self.shared(n, plan.round))
        return up, up


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


