"""SA-FedLoRA: simulated-annealing parameter allocation for federated LoRA (Yang, Liu, Gao, Xu, Wang,
arXiv 2405.09394).

Two stages on top of FedAvg-LoRA (A, B and head trained and averaged factor-wise):
1. Initiating stage, rounds [0, init_rounds): clients add the proximal term (mu/2)||theta - theta_global||^2
   over their trained tensors (FedProx style; which ones: `init_stage` below) to limit client drift. Its
   gradient mu*(local - global) is data-independent, so the engine adds it after clipping/noise (it costs no
   privacy).
2. Annealing stage: the LoRA rank budget stays at the high "heating" rank for `heating_rounds` more
   rounds, then follows `schedule` down to the "cooling" rank over `anneal_rounds` rounds and stays there.
   Whenever the budget shrinks (at the start of a round), every adapted module's global scale*B@A is
   truncated per federation to its top-k singular directions (the best rank-k approximation,
   Eckart-Young) and re-factored with a balanced split: B = U_k sqrt(S_k)/sqrt(s), A = sqrt(S_k) V_k^T
   /sqrt(s) (s = the scale after truncation), so both factors carry the same norm per direction.
   Client payloads shrink with the rank.

Choices (all config keys of `Params`):
- heating rank := lora.rank, the rank the stacked model is built with (`heating_rank` may repeat it;
  anything else is an error).
- `schedule`: linear | cosine | exponential (geometric from heating to cooling rank) | cubic (AdaLoRA's
  budget curve). r(x) for annealing progress x in [0, 1], rounded half up, never above the previous rank.
- `alpha_over`: "heating_rank" (default) keeps the scale alpha/heating_rank fixed, so truncation changes
  the effective weights only by the discarded singular values and later steps keep the same step size
  per direction; "current_rank" uses peft's alpha/r for the current r (the factors absorb the change,
  so the effective weights at truncation are the same either way).
- The proximal term covers every trained tensor (A, B, head; dW and head with init_stage "full") and only the
  initiating stage.

Initiating stage, `init_stage` (what the clients train in rounds [0, init_rounds)):
- "lora" (default): LoRA + head at the heating rank, with the proximal term on A, B and head.
- "full": the third-party reading of the paper (full-parameter training first). Clients train a dense delta
  dW [out, in] on every LoRA target weight (all out x in entries, `<target>.folded`: the engine's per-replica
  dense delta, fedsim/stacked.py) plus the head, with the proximal term mu (local - global) on both; A and B
  are not trained (B = 0: the adapter path adds exactly zero). The server averages dW like any shared tensor
  (sample-count weights), so after the stage each federation's effective weight is W0 + dW, dW = sum_i w_i
  dW_i. From round init_rounds on dW is frozen (never trained, never sent again: the backbone is W <- W0 + dW,
  per federation) and LoRA starts at the heating rank from its usual init (A seeded, B = 0: the factors were
  never trained) on that backbone, then heating / annealing / cooling as above; truncation acts on
  scale * B @ A only, never on dW. "Full" covers the LoRA target linears and the head, not embeddings or
  LayerNorms: the engine's trainable delta is per target weight (with lora.targets: all-linear, every Linear
  of the model but the head). Why a dense delta and not SLoRA's sparse one at density 1: the sparse forward
  gathers an [Rc, tokens, nnz] intermediate, which at nnz = out * in is far larger than the [Rc, out, in]
  delta, and the switch would have to fold it into a dense delta anyway. The communication figure depends
  on this reading: an initiating round sends out * in values per target (plus the head) each way per client,
  against (out + in) * r for "lora"; a resume restores dW from the checkpoint's global state. Memory: every
  replica holds its own dW (as full fine-tuning holds its weights), and under DP the per-sample gradients
  are [Rc, b, out * in] per target during the initiating stage.

Interpretations/deviations: with init_stage "lora" the initiating stage regularizes only LoRA + head at the
heating rank (see above for "full"). The rank is reduced by global SVD truncation on the server (the paper
reduces the trainable-parameter budget; its exact pruning rule is not reproduced). Singular directions with
zero singular value come out as zero in both factors (a saddle), which only happens if a module's update has
rank below the new rank.
"""
import math
from dataclasses import dataclass

import torch

from fedsim.interface import Change, ContainerSpec
from methods.fedavg_lora import FedAvgLoRA

SCHEDULES = ("linear", "cosine", "exponential", "cubic")
ALPHA_OVER = ("heating_rank", "current_rank")
INIT_STAGES = ("lora", "full")


@dataclass
class SAParams:
    init_rounds: int = 5            # R_init: rounds with the proximal term
    mu: float = 0.01                # proximal strength
    heating_rank: int | None = None  # must equal lora.rank (default: lora.rank)
    heating_rounds: int = 0         # rounds at the heating rank after the initiating stage
    anneal_rounds: int = 10         # rounds to go from heating to cooling rank
    cooling_rank: int = 2
    schedule: str = "linear"
    alpha_over: str = "heating_rank"
    init_stage: str = "lora"        # what the initiating stage trains: lora (A, B, head) | full (dense dW, head)


def truncate_lora(A, B, scale_old, scale_new, k):
    """Best rank-k factors of scale_old * B @ A per federation.

    A [F, r, in], B [F, out, r], scales [F]. Returns (A' [F, k, in], B' [F, out, k]) with
    scale_new * B' @ A' = U_k S_k V_k^T of scale_old * B @ A. Works on QR factors (r x r SVD, not
    out x in) in float64, then casts back.
    """
    dt = A.dtype
    A64, B64 = A.double(), B.double()
    qb, rb = torch.linalg.qr(B64)                             # [F, out, r], [F, r, r]
    qa, ra = torch.linalg.qr(A64.transpose(1, 2))             # [F, in, r],  [F, r, r]
    core = scale_old.double()[:, None, None] * rb @ ra.transpose(1, 2)
    uc, s, vhc = torch.linalg.svd(core)
    root = (s[:, :k] / scale_new.double()[:, None]).sqrt()   # [F, k]
    B_new = (qb @ uc[:, :, :k]) * root[:, None, :]
    A_new = root[:, :, None] * (vhc[:, :k, :] @ qa.transpose(1, 2))
    return A_new.to(dt), B_new.to(dt)


class SAFedLoRA(FedAvgLoRA):
    name = "sa_fedlora"
    Params = SAParams

    def __init__(self, lora, **params):
        super().__init__(lora, **params)
        p = self.params
        heat = p.heating_rank if p.heating_rank is not None else lora.rank
        if heat != lora.rank:
            raise ValueError(f"sa_fedlora heating_rank={heat} must equal lora.rank={lora.rank} (the model is "
                             f"built at lora.rank); set lora.rank={heat} or drop heating_rank")
        if not 1 <= p.cooling_rank <= heat:
            raise ValueError(f"sa_fedlora cooling_rank must be in [1, heating rank {heat}] (got {p.cooling_rank})")
        if p.schedule not in SCHEDULES:
            raise ValueError(f"sa_fedlora schedule '{p.schedule}' unknown; valid: {list(SCHEDULES)}")
        if p.alpha_over not in ALPHA_OVER:
            raise ValueError(f"sa_fedlora alpha_over '{p.alpha_over}' unknown; valid: {list(ALPHA_OVER)}")
        for key in ("init_rounds", "heating_rounds", "anneal_rounds"):
            if getattr(p, key) < 0:
                raise ValueError(f"sa_fedlora {key} must be >= 0 (got {getattr(p, key)})")
        if p.mu < 0:
            raise ValueError(f"sa_fedlora mu must be >= 0 (got {p.mu})")
        if p.init_stage not in INIT_STAGES:
            raise ValueError(f"sa_fedlora init_stage '{p.init_stage}' unknown; valid: {list(INIT_STAGES)}")
        if p.init_stage == "full" and p.init_rounds < 1:
            raise ValueError("sa_fedlora init_stage 'full' trains the dense deltas during the initiating stage, "
                             f"which has init_rounds={p.init_rounds} rounds; set init_rounds >= 1 or "
                             "init_stage: lora")
        self.heating_rank = heat
        self.rank = heat                     # current global rank budget

    @property
    def full(self):
        return self.params.init_stage == "full"

    # --- what is trained --------------------------------------------------------------------------
    def container(self):
        if not self.full:
            return super().container()
        return ContainerSpec("lora", folded=True, train_folded=True)     # the trained dense delta dW [R, out, in]

    def init_global(self, layout, seeds):
        change = super().init_global(layout, seeds)
        if self.full:
            for name, shape in layout.adapters.items():
                change.global_state[name + ".folded"] = torch.zeros(len(seeds), *shape)
        return change

    def trained(self, name, round_idx):
        """init_stage full: dW (`.folded`) and the head before round init_rounds, A, B and the head after."""
        if self.full and name.endswith((".folded", ".lora_A", ".lora_B")):
            return (round_idx < self.params.init_rounds) == name.endswith(".folded")
        return super().trained(name, round_idx)

    # --- schedule ---------------------------------------------------------------------------------
    def rank_at(self, round_idx):
        """The scheduled rank budget of a round (before the never-grow clamp)."""
        p, heat, cool = self.params, self.heating_rank, self.params.cooling_rank
        s = round_idx - p.init_rounds - p.heating_rounds
        if s <= 0:
            return heat
        if s >= p.anneal_rounds:
            return cool
        x = s / p.anneal_rounds
        if p.schedule == "exponential":
            r = heat * (cool / heat) ** x
        else:
            f = {"linear": 1 - x, "cosine": 0.5 * (1 + math.cos(math.pi * x)), "cubic": (1 - x) ** 3}[p.schedule]
            r = cool + (heat - cool) * f
        return min(heat, max(cool, math.floor(r + 0.5)))

    def _scale(self, layout, rank):
        """Per-federation LoRA scale [F] at `rank`, from the scales of the container's current rank."""
        s = layout.scales
        return s * layout.rank / rank if self.params.alpha_over == "current_rank" else s

    def on_round_start(self, round_idx, global_state, layout):
        a_name = next(n for n in global_state if n.endswith(".lora_A"))
        g_rank = global_state[a_name].shape[1]
        target = min(self.rank_at(round_idx), g_rank)          # the budget never grows
        if target < g_rank:
            global_state = dict(global_state)
            for name in layout.adapters:
                A, B = global_state[name + ".lora_A"], global_state[name + ".lora_B"]
                A, B = truncate_lora(A, B, self._scale(layout, g_rank).to(A), self._scale(layout, target).to(A), target)
                global_state[name + ".lora_A"], global_state[name + ".lora_B"] = A, B
        self.rank = target
        if layout.rank == target:
            return Change(global_state)
        # the container is at another rank (also after a resume: it is rebuilt at the heating rank)
        return Change(global_state, rank=target, scales=self._scale(layout, target))

    # --- initiating stage -------------------------------------------------------------------------
    def local_regularizer_grad(self, name, local, global_bcast, round_idx, client_ids, local_of):
        if round_idx >= self.params.init_rounds or self.params.mu == 0:
            return None
        return self.params.mu * (local.detach() - global_bcast())

    def state_dict(self):
        # the schedule is a function of the round; the current rank is also implied by the global shapes; the
        # dense deltas of init_stage full are global tensors (`.folded`), in the engine's checkpoint
        return {"rank": self.rank}

    def load_state_dict(self, d):
        self.rank = int(d["rank"])
