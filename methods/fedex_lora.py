"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025, arXiv 2410.09432): FedAvg-LoRA plus the residual that makes the
aggregate exact.

Averaging A and B separately gives mean(B) mean(A), not the mean of the clients' updates B_i A_i. FedEx-LoRA
keeps the averaged factors for the next round and folds the difference into the frozen weight:

    A <- sum_i w_i A_i,   B <- sum_i w_i B_i,
    W_folded <- W_folded + scale (sum_i w_i B_i A_i - B A),

so the global effective weight W + W_folded + scale B A equals the weighted mean of the clients' effective
weights exactly (w_i: sample counts, as FedAvg). Clients train A, B and the head from there.
Interpretations:
- W_folded is each federation's own dense delta on every adapted weight (`<target>.folded`, [out, in]); no
  client trains it.
- Download per client: A, B, the head and the residual update of every adapted weight (dense out x in: the
  price of exactness); upload: A, B and the head, as FedAvg-LoRA.
- Server optimizers are refused: they would step A and B away from the averages the residual was computed for.
- Client-level DP is refused: the residual is built from each client's own B_i A_i, not from clipped, noised
  averages.
"""
import torch

from fedsim.interface import Change, ContainerSpec
from methods.fedavg_lora import FedAvgLoRA


class FedExLoRA(FedAvgLoRA):
    name = "fedex_lora"
    Params = None
    server_optimizer_unsupported = "the residual folded into the frozen weight is exact only for the plain averages"
    client_dp_unsupported = "the residual is built from each client's own B_i A_i, not from clipped, noised averages"

    def container(self):
        return ContainerSpec("lora", folded=True)

    def trained(self, name, round_idx):
        return not name.endswith(".folded") and super().trained(name, round_idx)

    def init_global(self, layout, seeds):
        state = super().init_global(layout, seeds).global_state
        for name, shape in layout.adapters.items():
            state[name + ".folded"] = torch.zeros(len(seeds), *shape)
        self.scales = layout.scales                          # [F]: the folded delta is scale x B A
        return Change(state)

    def on_round_start(self, round_idx, global_state, layout):
        self.scales = layout.scales
        return Change(global_state)

    def mean_product(self, name, client_states, weights):
        """scale sum_i w_i B_i A_i of adapter `name`: [F, out, in]."""
        B, A = client_states[name + ".lora_B"], client_states[name + ".lora_A"]
        prod = torch.einsum("fm,fmor,fmri->foi", weights.to(B.dtype), B, A)
        return self.scales.to(prod).view(-1, 1, 1) * prod

    def adapters(self, global_state):
        return [n[: -len(".folded")] for n in global_state if n.endswith(".folded")]

    def aggregate(self, global_state, client_states, weights, plan):
        new = super().aggregate(global_state, client_states, weights, plan)
        for name in self.adapters(global_state):
            averaged = self.scales.to(weights).view(-1, 1, 1) * (new[name + ".lora_B"] @ new[name + ".lora_A"])
            new[name + ".folded"] = global_state[name + ".folded"] + (
                self.mean_product(name, client_states, weights) - averaged)
        return new

    def payload_bytes(self, global_state, plan):
        up, down = super().payload_bytes(global_state, plan)
        residual = sum(t[0].numel() * t.element_size() for n, t in global_state.items() if n.endswith(".folded"))
        return up, down + residual
