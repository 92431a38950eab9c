"""FLoRA (Wang, Shen, Tsai, Chen, Hong, Chen, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976): aggregate by stacking.

Each round the clients train fresh LoRA factors; the server stacks them, A_stack = [w_1 A_1; ...; w_m A_m] and
B_stack = [B_1, ..., B_m], whose product B_stack A_stack = sum_i w_i B_i A_i is the exact weighted mean of the
clients' updates. Every client receives the stack and merges it into its frozen weight, then starts the next
round from newly initialised LoRA factors:

    W_folded <- W_folded + scale sum_i w_i B_i A_i,   A <- fresh Kaiming-uniform (keyed by seed, round),  B <- 0.

Interpretations:
- W_folded is each federation's own dense delta on every adapted weight (`<target>.folded`); the stack is
  never materialised, only its product (the same numbers up to float rounding).
- Heterogeneous ranks (the paper's point, which stacking allows): with `rank_choices`, client i trains the first
  r_i slots of fresh rank-r factors (methods/client_ranks.py: drawn once per client, the rest held at zero), so
  its B_i A_i has rank r_i and the stack has sum_i r_i rows. Without it every client has the run's rank.
- Upload per client: its A_i, B_i (r_i slots) and the head; download: the whole stack (every sampled client's
  factors at its rank) and the head.
- Server optimizers and client-level DP are refused, as for FedEx-LoRA: the merged product is built from each
  client's own factors.
"""
from dataclasses import dataclass

import torch

from fedsim.rng import torch_generator
from methods.initializers import kaiming_uniform_A
from methods.client_ranks import ClientRanks, check_rank_choices, is_factor
from methods.fedex_lora import FedExLoRA


@dataclass
class FLoRAParams:
    rank_choices: list | None = None   # client ranks drawn uniformly from these (<= lora.rank); None: all at lora.rank


class FLoRA(FedExLoRA):
    name = "flora"
    server_optimizer_unsupported = "the server merges the clients' stacked factors, it keeps no averaged A and B"
    client_dp_unsupported = "the merged product is built from each client's own B_i A_i, not from clipped, noised averages"
    Params = FLoRAParams

    def __init__(self, lora, **params):
        super().__init__(lora, **params)
        choices = self.params.rank_choices
        self.ranks = ClientRanks(check_rank_choices(self.name, choices, lora.rank) if choices else [lora.rank])

    def init_global(self, layout, seeds):
        self.seeds = list(seeds)                            # fresh A every round, keyed by the federation's seed
        self.ranks.seeds = self.seeds
        return super().init_global(layout, seeds)

    def client_mask(self, name, shape, client_ids):
        return self.ranks.mask(name, shape, client_ids) if self.params.rank_choices else None

    def aggregate(self, global_state, client_states, weights, plan):
        new = super(FedExLoRA, self).aggregate(global_state, client_states, weights, plan)    # the head: FedAvg
        for name in self.adapters(global_state):
            new[name + ".folded"] = global_state[name + ".folded"] + self.mean_product(name, client_states, weights)
            A = global_state[name + ".lora_A"]
            new[name + ".lora_A"] = torch.stack([kaiming_uniform_A(
                A.shape[1:], torch_generator(s, "lora_A", name, plan.round + 1)) for s in self.seeds]).to(A)
            new[name + ".lora_B"] = torch.zeros_like(global_state[name + ".lora_B"])
        return new

    def payload_bytes(self, global_state, plan):
        """Per client (lists, replica order): up its own r_i slots and the head; down its federation's whole stack
        (the sum of the sampled clients' ranks) and the head."""
        per_slot = self.ranks.bytes_per_slot(global_state)
        head = sum(t[0].numel() * t.element_size() for n, t in global_state.items()
                   if self.shared(n, plan.round) and not is_factor(n))
        ranks = [self.ranks.rank(f, c) for f, c in plan.client_ids]
        stack = {f: sum(r for (g, _), r in zip(plan.client_ids, ranks) if g == f) for f, _ in plan.client_ids}
        return [r * per_slot + head for r in ranks], [stack[f] * per_slot + head for f, _ in plan.client_ids]
