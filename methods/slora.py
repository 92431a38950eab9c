"""SLoRA (Babakniya et al. 2023, arXiv 2308.06522): federated sparse fine-tuning, then LoRA initialised from it.

Stage 1 (rounds 0 .. stage1_rounds-1): clients train a sparse delta on every LoRA target weight, plus the head.
The mask of each target matrix holds exactly round(density * out * in) positions drawn uniformly without
replacement from a generator keyed by `mask_seed` and the module name. The server generates it once; it is
the same for every client and every federation of a pass (the engine shares one index set), and it does not
depend on the federation seed, so a federation run in a multi-seed pass equals the same federation run alone.
Only the values travel (nnz numbers per target + head, both ways); the server averages them by sample counts.
LoRA is present but untrained, with B = 0, so its path contributes exactly zero.

Stage 2 (from round stage1_rounds on): the accumulated update dW of each target (the averaged values scattered
into [out, in]) is factored by SVD, dW = U S V^T (float64), and LoRA is set to its best rank-r approximation
with the singular values split evenly between the factors:
    B = U_r diag(sqrt(S_r / scale)),  A = diag(sqrt(S_r / scale)) V_r^T,  so  scale * B A = U_r S_r V_r^T,
scale = alpha / r of each federation. The sparse delta is then dropped: the base weights are back to their
pretrained values and the effective weight is W0 + rank-r(dW) (Eckart-Young: the closest rank-r matrix to
W0 + dW). Training continues as FedAvg-LoRA (A, B and head).
"""
from dataclasses import dataclass

import torch

from fedsim.rng import torch_generator
from fedsim.interface import Change, Method
from methods.initializers import init_head


@dataclass
class SLoRAParams:
    stage1_rounds: int = 10      # R1: rounds of sparse fine-tuning before the switch to LoRA
    density: float = 0.01        # fraction of each target matrix's entries trained in stage 1
    mask_seed: int = 0           # server seed of the random masks


class SLoRA(Method):
    name = "slora"
    Params = SLoRAParams

    def __init__(self, lora, **params):
        super().__init__(lora, **params)
        if self.params.stage1_rounds < 1:
            raise ValueError(f"slora stage1_rounds must be >= 1 (got {self.params.stage1_rounds}): "
                             "stage 2 initialises LoRA from the stage-1 update")
        if not 0 < self.params.density <= 1:
            raise ValueError(f"slora density must be in (0, 1] (got {self.params.density}); the paper uses 0.01")
        self._masks = {}

    def mask(self, name, shape):
        """(rows, cols) of target `name`'s stage-1 mask for a weight of shape (out, in), row-major sorted."""
        key = (name, tuple(shape))
        if key not in self._masks:
            out, n_in = shape
            nnz = max(1, round(self.params.density * out * n_in))
            g = torch_generator(self.params.mask_seed, "slora_mask", name)
            idx = torch.randperm(out * n_in, generator=g)[:nnz].sort().values
            self._masks[key] = (idx // n_in, idx % n_in)
        return self._masks[key]

    def masks(self, layout):
        """{target: (rows, cols)}: every target's stage-1 mask (the engine attaches each once)."""
        return {name: self.mask(name, shape) for name, shape in layout.adapters.items()}

    def init_global(self, layout, seeds):
        masks = self.masks(layout)
        state = {name + ".sparse": torch.zeros(len(seeds), len(rows)) for name, (rows, _) in masks.items()}
        state.update(init_head(layout, seeds))
        return Change(state, sparse=masks)

    def trained(self, name, round_idx):
        stage1 = round_idx < self.params.stage1_rounds
        if name.endswith(".sparse"):
            return stage1
        if name.endswith((".lora_A", ".lora_B")):
            return not stage1
        return True                             # the head trains throughout

    def on_round_start(self, round_idx, global_state, layout):
        if round_idx < self.params.stage1_rounds:
            return Change(global_state, sparse=self.masks(layout))
        if any(k.endswith(".sparse") for k in global_state):    # first stage-2 round (also after a resume)
            return Change(self._sparse_to_lora(global_state, layout), sparse={})
        return Change(global_state, sparse={})  # resumed in stage 2 on a fresh model: no delta to keep

    def _sparse_to_lora(self, global_state, layout):
        """The stage-2 LoRA factors of every target from the averaged stage-1 values; the head unchanged."""
        state = {}
        for name, (out, n_in) in layout.adapters.items():
            values = global_state[name + ".sparse"]                           # [F, nnz]
            F = values.shape[0]
            rows, cols = self.mask(name, (out, n_in))
            dW = torch.zeros(F, out, n_in, dtype=torch.float64, device=values.device)
            dW[:, rows.to(values.device), cols.to(values.device)] = values.double()
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            r = min(layout.rank, S.shape[1])
            scale = layout.scales.to(values.device, torch.float64)
            root = (S[:, :r] / scale[:, None]).sqrt()
            A = torch.zeros(F, layout.rank, n_in, dtype=torch.float64, device=values.device)
            B = torch.zeros(F, out, layout.rank, dtype=torch.float64, device=values.device)
            A[:, :r] = root[:, :, None] * Vh[:, :r]
            B[:, :, :r] = U[:, :, :r] * root[:, None, :]
            state[name + ".lora_A"], state[name + ".lora_B"] = A.to(values.dtype), B.to(values.dtype)
            # the engine drops the sparse deltas (Change.sparse = {}): the delta now lives in LoRA
        state.update({k: v for k, v in global_state.items() if not k.endswith(".sparse")})     # the head
        return state
