"""HetLoRA (Cho, Manoel, Joshi, Sahu, Marchi, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv 2401.06432): clients of different capacity train LoRA at different ranks.

The global adapters have the run's rank r (lora.rank), the largest. Client i has its own rank r_i <= r, drawn
once from `rank_choices` (uniformly, keyed by the federation's seed and the client id). It receives the
global factors truncated to its rank (the first r_i rows of A, columns of B), trains them, and sends them
back; the server zero-pads every client's factors to rank r and averages:

    A <- sum_i w_i pad(A_i),   B <- sum_i w_i pad(B_i),

with w_i the sample counts (`weighting: samples`, zero-padded FedAvg) or, per adapter, the Frobenius norm of
the client's update ||B_i A_i|| (`weighting: norm`, the paper's sparsity-weighted aggregation). The head is
FedAvg's.
Interpretations:
- A client's truncated slots stay exactly zero while it trains: the engine zeroes them on receipt and masks
  their gradient (under DP also the noise, which would otherwise fill them). In LoRA their data gradient is
  zero anyway, since B's column j and A's row j multiply each other.
- Bytes: each client sends and receives r_i (in + out) numbers per adapter and the head; the ledger counts
  every client's own payload.
- Evaluation scores the global model at the full rank r (also the personalized accuracy: a client's own model
  would be the global truncated to r_i, which no hook evaluates yet).
- The paper's local rank self-pruning (a client shrinking r_i during training) is not implemented: ranks are
  fixed per client.
"""
from dataclasses import dataclass

import torch

from fedsim.rng import numpy_rng
from methods.fedavg_lora import FedAvgLoRA

WEIGHTINGS = ("samples", "norm")


@dataclass
class HetLoRAParams:
    rank_choices: list | None = None   # client ranks drawn uniformly from these; None: [r/4, r/2, r] of lora.rank
    weighting: str = "samples"         # zero-padded FedAvg by sample counts, or "norm": by ||B_i A_i|| per adapter


class HetLoRA(FedAvgLoRA):
    name = "hetlora"
    Params = HetLoRAParams

    def __init__(self, lora, **params):
        super().__init__(lora, **params)
        r = lora.rank
        choices = self.params.rank_choices or sorted({max(1, r // 4), max(1, r // 2), r})
        bad = [c for c in choices if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= r]
        if not choices or bad:
            raise ValueError(f"method hetlora rank_choices {self.params.rank_choices} must be integers in 1..{r} "
                             f"(the global rank lora.rank={r} is the largest a client may have); got {bad or 'none'}")
        if self.params.weighting not in WEIGHTINGS:
            raise ValueError(f"method hetlora weighting must be one of {WEIGHTINGS} (got {self.params.weighting!r})")
        self.choices = list(choices)
        self.seeds = []

    def init_global(self, layout, seeds):
        self.seeds = list(seeds)
        return super().init_global(layout, seeds)

    def client_rank(self, federation, client):
        """r_i of a client of the federation at this index (fixed for the whole run)."""
        rng = numpy_rng(self.seeds[federation], "hetlora_rank", client)
        return int(self.choices[rng.integers(len(self.choices))])

    def client_mask(self, name, shape, client_ids):
        if not name.endswith((".lora_A", ".lora_B")):
            return None
        ranks = torch.tensor([self.client_rank(f, c) for f, c in client_ids])
        slot = torch.arange(shape[0] if name.endswith(".lora_A") else shape[1])
        keep = slot[None, :] < ranks[:, None]                                  # [Rc, r]
        return keep[:, :, None].expand(-1, *shape) if name.endswith(".lora_A") else \
            keep[:, None, :].expand(-1, *shape)

    def aggregate(self, global_state, client_states, weights, plan):
        new = super().aggregate(global_state, client_states, weights, plan)    # zero-padded FedAvg
        if self.params.weighting == "norm":
            for name_B in [n for n in client_states if n.endswith(".lora_B")]:
                name_A = name_B[: -len("B")] + "A"
                B, A = client_states[name_B], client_states[name_A]
                norm = torch.linalg.matrix_norm(B @ A)                           # [F, m]: ||B_i A_i||_F
                total = norm.sum(1, keepdim=True)
                w = torch.where(total > 0, norm / total.clamp(min=torch.finfo(norm.dtype).tiny), weights)  # 0: samples
                new[name_A] = torch.einsum("fm,fm...->f...", w, A)
                new[name_B] = torch.einsum("fm,fm...->f...", w, B)
        return new

    def payload_bytes(self, global_state, plan):
        """Per client (a list, replica order): its rank's share of the factors plus the head, each way."""
        factors = {n: t[0] for n, t in global_state.items() if n.endswith((".lora_A", ".lora_B"))}
        per_rank = sum(t.numel() * t.element_size() for t in factors.values()) // self.lora_rank(factors)
        rest = sum(t[0].numel() * t.element_size() for n, t in global_state.items()
                   if self.shared(n, plan.round) and n not in factors)
        sizes = [self.client_rank(f, c) * per_rank + rest for f, c in plan.client_ids]
        return sizes, sizes

    @staticmethod
    def lora_rank(factors):
        return next(t.shape[0] for n, t in factors.items() if n.endswith(".lora_A"))
