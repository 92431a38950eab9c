"""HetLoRA (Cho, Manoel, Joshi, Sahu, Marchi, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv 2401.06432): clients of different capacity train LoRA at different ranks.

The global adapters have the run's rank r (lora.rank), the largest. Client i has its own rank r_i <= r, drawn
once from `rank_choices` (methods/client_ranks.py). It receives the global factors truncated to its rank (the
first r_i rows of A, columns of B), trains them, and sends them back; the server zero-pads every client's factors
to rank r and averages:

    A <- sum_i w_i pad(A_i),   B <- sum_i w_i pad(B_i),

with w_i the sample counts (`weighting: samples`, zero-padded FedAvg) or, per adapter, the Frobenius norm of
the client's update ||B_i A_i|| (`weighting: norm`, the paper's sparsity-weighted aggregation). The head is
FedAvg's.

Local rank self-pruning (`prune_gamma` = the paper's decay factor gamma in (0, 1); off when null). With
k_i = floor(gamma r_i), each client adds to its local loss

    prune_lambda * sum_adapters ||A_i[k_i:r_i, :]||_F ||B_i[:, k_i:r_i]||_F,

a pull toward zero on its last r_i - k_i slots. After local training it measures that sum of norm products, Q_i.
If Q_i is below the Q_i of its previous participation, the tail carries ever less and the client prunes it:
r_i <- k_i (never below 1), sends only its first k_i slots (the server averages those, the ledger counts them)
and trains at the lower rank from then on.
Interpretations:
- A client's truncated slots stay exactly zero while it trains: the engine zeroes them on receipt and masks
  their gradient (under DP also the noise, which would otherwise fill them). In LoRA their data gradient is
  zero anyway, since B's column j and A's row j multiply each other.
- The pruning penalty's gradient is added after DP's clipping and noise (a function of the model, not of the
  data, as FedProx's term). Q_i is measured on the client's DP-trained model: post-processing under
  sample-level DP. Client-level DP is refused with pruning: the rank a client sends depends on its unnoised
  update.
- "Previous participation": a client sampled for the first time, or right after pruning, only records Q_i.
  The pruned rank is method state, kept per federation and client id (checkpointed).
- Bytes: each client receives r_i (before pruning) and sends r_i (after) numbers per slot of every adapter,
  plus the head; the ledger counts every client's own payload.
- Evaluation scores the global model at the full rank r (also the personalized accuracy: a client's own model
  would be the global truncated to r_i, which no hook evaluates yet).
"""
import math
from dataclasses import dataclass

import torch

from methods.client_ranks import ClientRanks, check_rank_choices, is_factor
from methods.fedavg_lora import FedAvgLoRA

WEIGHTINGS = ("samples", "norm")


@dataclass
class HetLoRAParams:
    rank_choices: list | None = None   # client ranks drawn uniformly from these; None: [r/4, r/2, r] of lora.rank
    weighting: str = "samples"         # zero-padded FedAvg by sample counts, or "norm": by ||B_i A_i|| per adapter
    prune_gamma: float | None = None   # self-pruning decay factor in (0, 1): a client may prune r_i to gamma r_i
    prune_lambda: float = 0.01         # weight of the pruning penalty on the last r_i - floor(gamma r_i) slots


class HetLoRA(FedAvgLoRA):
    name = "hetlora"
    Params = HetLoRAParams

    def __init__(self, lora, **params):
        super().__init__(lora, **params)
        p = self.params
        self.ranks = ClientRanks(check_rank_choices(self.name, p.rank_choices, lora.rank))
        if p.weighting not in WEIGHTINGS:
            raise ValueError(f"method hetlora weighting must be one of {WEIGHTINGS} (got {p.weighting!r})")
        if p.prune_gamma is not None and not 0 < p.prune_gamma < 1:
            raise ValueError(f"method hetlora prune_gamma must be in (0, 1) (got {p.prune_gamma}); a client prunes "
                             f"its rank r_i to floor(prune_gamma r_i); null turns pruning off")
        if not p.prune_lambda >= 0:
            raise ValueError(f"method hetlora prune_lambda must be >= 0 (got {p.prune_lambda})")
        if p.prune_gamma is not None:
            self.client_dp_unsupported = "with prune_gamma the rank a client sends depends on its unnoised update"
        self.last_tail = {}                    # (federation index, client id) -> Q_i at its last participation

    def init_global(self, layout, seeds):
        self.ranks.seeds = list(seeds)
        return super().init_global(layout, seeds)

    def client_rank(self, federation, client):
        """r_i of a client of the federation at this index (lowered only by self-pruning)."""
        return self.ranks.rank(federation, client)

    def client_mask(self, name, shape, client_ids):
        return self.ranks.mask(name, shape, client_ids)

    # --- self-pruning -----------------------------------------------------------------------------------
    def kept_rank(self, rank):
        """floor(gamma r_i): the slots a client keeps if it prunes."""
        return math.floor(self.params.prune_gamma * rank)

    def tail(self, client_ids, width, device):
        """[len(client_ids), width] bool: each client's slots floor(gamma r_i) .. r_i - 1."""
        ranks = [self.client_rank(f, c) for f, c in client_ids]
        keep = torch.tensor([self.kept_rank(r) for r in ranks], device=device)
        slot = torch.arange(width, device=device)[None, :]
        return (slot >= keep[:, None]) & (slot < torch.tensor(ranks, device=device)[:, None])

    @staticmethod
    def partner(name):
        return name[: -len("A")] + "B" if name.endswith(".lora_A") else name[: -len("B")] + "A"

    @staticmethod
    def tail_norms(A, B, tail):
        """||A[tail]||_F and ||B[:, tail]||_F per client: A [..., r, in], B [..., out, r], tail [..., r]."""
        return (A * tail[..., :, None]).flatten(-2).norm(dim=-1), (B * tail[..., None, :]).flatten(-2).norm(dim=-1)

    def local_regularizer_grad(self, name, local, global_bcast, round_idx, client_ids, local_of):
        """Gradient of prune_lambda ||A_t|| ||B_t|| (A_t, B_t: the tail slots): lambda ||B_t|| A_t / ||A_t|| for A,
        lambda ||A_t|| B_t / ||B_t|| for B (zero where the norm is zero)."""
        if self.params.prune_gamma is None or self.params.prune_lambda == 0 or not is_factor(name):
            return None
        mine, other = local.detach(), local_of(self.partner(name)).detach()
        A, B = (mine, other) if name.endswith(".lora_A") else (other, mine)
        tail = self.tail(client_ids, A.shape[1], A.device)
        norm_A, norm_B = self.tail_norms(A, B, tail)
        own, partner = (norm_A, norm_B) if name.endswith(".lora_A") else (norm_B, norm_A)
        shape = (-1,) + (1,) * (mine.dim() - 1)
        scale = self.params.prune_lambda * partner / own.clamp(min=torch.finfo(own.dtype).tiny)
        held = tail[:, :, None] if name.endswith(".lora_A") else tail[:, None, :]
        return torch.where(own.view(shape) > 0, scale.view(shape) * mine, 0.0) * held

    @torch.no_grad()
    def prune(self, client_states, plan):
        """Each sampled client whose Q_i fell since its last participation prunes its tail: its rank drops to
        floor(gamma r_i) and its sent factors lose those slots. Returns the client states as sent."""
        num_feds, per_fed = len(plan.sampled), len(plan.sampled[0])
        A_names = [n for n in client_states if n.endswith(".lora_A")]
        width = client_states[A_names[0]].shape[2]
        tail = self.tail(plan.client_ids, width, client_states[A_names[0]].device).view(num_feds, per_fed, width)
        q = sum(torch.mul(*self.tail_norms(client_states[n], client_states[self.partner(n)], tail)) for n in A_names)
        sent = dict(client_states)
        for r, ((f, c), now) in enumerate(zip(plan.client_ids, q.flatten().tolist())):
            before, rank = self.last_tail.get((f, c)), self.client_rank(f, c)
            keep = self.kept_rank(rank)
            if before is not None and now < before and 1 <= keep < rank:
                self.ranks.lower(f, c, keep)
                self.last_tail.pop((f, c))
                for n in A_names:
                    for name, slots in ((n, (f, r % per_fed, slice(keep, None))),
                                        (self.partner(n), (f, r % per_fed, slice(None), slice(keep, None)))):
                        sent[name] = sent[name].clone() if sent[name] is client_states[name] else sent[name]
                        sent[name][slots] = 0
            else:
                self.last_tail[(f, c)] = now
        return sent

    def aggregate(self, global_state, client_states, weights, plan):
        if self.params.prune_gamma is not None:
            client_states = self.prune(client_states, plan)
        new = super().aggregate(global_state, client_states, weights, plan)    # zero-padded FedAvg
        if self.params.weighting == "norm":
            for name_B in [n for n in client_states if n.endswith(".lora_B")]:
                name_A = self.partner(name_B)
                B, A = client_states[name_B], client_states[name_A]
                norm = torch.linalg.matrix_norm(B @ A)                           # [F, m]: ||B_i A_i||_F
                total = norm.sum(1, keepdim=True)
                w = torch.where(total > 0, norm / total.clamp(min=torch.finfo(norm.dtype).tiny), weights)  # 0: samples
                new[name_A] = torch.einsum("fm,fm...->f...", w, A)
                new[name_B] = torch.einsum("fm,fm...->f...", w, B)
        return new

    def payload_bytes(self, global_state, plan):
        """Per client (lists, replica order): the head plus its rank's share of the factors, received at the rank
        it trained (plan.client_masks) and sent at its rank after self-pruning."""
        per_slot = self.ranks.bytes_per_slot(global_state)
        rest = sum(t[0].numel() * t.element_size() for n, t in global_state.items()
                   if self.shared(n, plan.round) and not is_factor(n))
        A = next(n for n in global_state if n.endswith(".lora_A"))
        received = plan.client_masks[A][:, :, 0].sum(1).tolist() if plan.client_masks else \
            [self.client_rank(f, c) for f, c in plan.client_ids]
        up = [self.client_rank(f, c) * per_slot + rest for f, c in plan.client_ids]
        return up, [int(r) * per_slot + rest for r in received]

    def state_dict(self):
        return {"ranks": self.ranks.state_dict(), "last_tail": [[f, c, q] for (f, c), q in sorted(self.last_tail.items())]}

    def load_state_dict(self, d):
        self.ranks.load_state_dict(d.get("ranks", {}))
        self.last_tail = {(f, c): q for f, c, q in d.get("last_tail", [])}
