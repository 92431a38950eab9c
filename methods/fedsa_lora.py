"""FedSA-LoRA (Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025, arXiv 2410.01463): share A, keep B.

Clients train A, B and the classification head. Only A (and the head) go to the server, which averages them
by client sample counts; each client keeps its own B between rounds (client-local state: the engine stores it
per client id and never aggregates it). The paper's reading: A learns what clients have in common, B what is
specific to each client. A starts from peft's default (Kaiming-uniform) from the federation seed, as in
FedAvg-LoRA; every client's B starts at zero.
Interpretations:
- Classification head: trained and shared by default (`local_head=False`), like the adapters' shared half;
  the paper's figure shares only A of the adapters and says nothing of the head. `local_head=True` keeps it
  on the client too.
- Payload per round and client: A (+ head) each way; B never travels.
- The global model (shared tensors with B at its initial zero) is what `evaluate` scores; each client's own
  model is global A and head with its stored B.
"""
from dataclasses import dataclass

from methods.fedavg_lora import FedAvgLoRA


@dataclass
class FedSAParams:
    local_head: bool = False     # keep the classification head on each client as well


class FedSALoRA(FedAvgLoRA):
    name = "fedsa_lora"
    Params = FedSAParams

    def client_local(self, name, round_idx):
        if name.endswith(".lora_B"):
            return True
        return self.params.local_head and not name.endswith(".lora_A")
