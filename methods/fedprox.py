"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks",
MLSys 2020, arXiv 1812.06127) over LoRA: FedAvg-LoRA whose clients minimise their loss plus the proximal term

    mu / 2 * ||w - w_global||^2,   gradient mu * (w - w_global),

over every tensor they train (A, B and the head), w_global being what the round started from. The term pulls
each client's local steps back toward the global model, so clients with skewed data drift less.
Interpretations:
- The proximal gradient is added after DP's clipping and noise: it is data-independent (w_global is public
  to the client), so it costs no privacy and is not clipped.
- mu = 0 is FedAvg-LoRA exactly (tested bit for bit).
"""
from dataclasses import dataclass

from methods.fedavg_lora import FedAvgLoRA


@dataclass
class FedProxParams:
    mu: float = 0.01         # proximal weight; the paper tunes it over {0.001, 0.01, 0.1, 1}


class FedProx(FedAvgLoRA):
    name = "fedprox"
    Params = FedProxParams

    def __init__(self, lora, **params):
        super().__init__(lora, **params)
        if not self.params.mu >= 0:
            raise ValueError(f"method fedprox parameter mu must be >= 0 (got {self.params.mu}); mu = 0 is FedAvg, "
                             f"the paper tunes it over 0.001, 0.01, 0.1, 1")

    def local_regularizer_grad(self, name, local, global_bcast, round_idx, client_ids, local_of):
        if self.params.mu == 0:
            return None
        return self.params.mu * (local.detach() - global_bcast())
