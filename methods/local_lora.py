"""Local-only LoRA: every client trains its own adapters and head and never sends anything.

Why it exists. A personalized method (FedSA-LoRA keeps each client's B) is scored on each client's own model on
rows held out of its data. Under label skew a client that never federates can already score well there, so a
personalized "win" means something only beside this baseline (and the local majority-label one that every run
with held-out client rows reports, fedsim.evaluation.personal_majority_accuracy).

What it computes. Each client starts from the federation's initial model (A drawn from the federation seed as
in FedAvg-LoRA, B = 0, the seeded head) and, whenever it is sampled, runs the same local steps on its own
rows from where it stopped: client c's tensors after its k-th participation are exactly k rounds of local
training on its data alone, with the same schedule, batches and optimizer as in the federation (stateless
clients: the optimizer state restarts each round). Every trained tensor is client-local (the engine keeps it
per client id), none is shared: upload = download = 0 bytes, and the global model stays at its initial value,
so its accuracy is the untrained model's; the reported number is the personalized accuracy.
Under sample-level DP each client's steps are clipped and noised as in any run (the accounting is per sample,
as for FedAvg-LoRA); client-level DP protects what clients send, which is nothing here.
"""
from methods.fedavg_lora import FedAvgLoRA


class LocalLoRA(FedAvgLoRA):
    name = "local_lora"
    Params = None
    client_dp_unsupported = "a local-only client sends nothing, so there is no update to clip and noise"
    server_optimizer_unsupported = "a local-only run has no aggregate for a server optimizer to step on"

    def client_local(self, name, round_idx):
        """Every trained tensor (A, B, the head) stays on its client."""
        return self.trained(name, round_idx)
