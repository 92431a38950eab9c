"""The plan of a round, decided before any compute: which clients of each federation train, on which rows,
and which tensors they train, share and keep (pfl-research style: plan, client and server kept apart).

Every random draw is keyed by the federation's seed and purpose (fedsim.sampling), never by its position in
the pass, so a federation's plan is the one it would have alone.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsim.sampling import fixed_batches, poisson_batches, sample_clients


@dataclass(frozen=True)
class RoundPlan:
    """Everything a round decides before any compute, built once (FederatedEngine.plan_round) and never changed:
    which clients train, on which rows, and what they train, share, keep and hold. Replica r =
    f * clients_per_round + j is the j-th sampled client of federation f."""
    round: int
    sampled: list                   # per federation: sorted ids of its sampled clients
    client_ids: list                # per replica: (federation, client id)
    rows: torch.Tensor              # [R, K, b] dataset rows of every replica's local steps
    masks: torch.Tensor             # [R, K, b] real samples (Poisson batches under DP; all True otherwise)
    trained: list                   # tensor names the clients train (gradients, clipping, noise)
    shared: list                    # ... send to the server to aggregate
    client_local: list              # ... keep per client between rounds
    expected_batch: torch.Tensor | None = None   # [R] each replica's expected Poisson batch (DP), else None
    num_clients: int = 0            # clients of each federation (sampled or not)
    local_steps: int = 0            # K local steps per sampled client
    lrs: tuple = ()                 # per federation: its client learning rate
    client_masks: dict = field(default_factory=dict)  # {name: [R, *shape] 0/1}: what each client holds, where
    #                                                   the method limits it (HetLoRA: its rank's slots)

    def clients_of(self, rs=slice(None)):
        """(federation index [Rc], client id [Rc]) of the replicas rs, as long tensors."""
        ids = self.client_ids[rs]
        return torch.tensor([f for f, _ in ids]), torch.tensor([c for _, c in ids])


def plan_round(t, federations, method, tensor_shapes, *, client_fraction, local_steps, batch_size, dp, device,
               dtype=torch.float32):
    """The RoundPlan of round t. tensor_shapes: {name: per-replica shape} of the container's tensors, in
    canonical order; dp: the engine's DPSetup (Poisson batches, expected batch sizes) or None."""
    num_clients = len(federations[0].partitions)
    sampled = [sample_clients(num_clients, client_fraction, f.seed, t) for f in federations]
    rows, masks = [], []
    for fed, clients in zip(federations, sampled):
        for c in clients:
            part = fed.partitions[c]
            if dp is None:
                pos = fixed_batches(len(part), batch_size, local_steps, fed.seed, t, c)
                mask = np.ones_like(pos, dtype=bool)
            else:
                pos, mask = poisson_batches(len(part), dp.sample_rate, dp.max_batch, local_steps, fed.seed, t, c)
            rows.append(part[pos])
            masks.append(mask)
    client_ids = [(i, int(c)) for i, cl in enumerate(sampled) for c in cl]
    expected = None
    if dp is not None:
        sizes = [len(federations[i].partitions[c]) for i, c in client_ids]
        expected = torch.tensor([dp.sample_rate * n for n in sizes], device=device, dtype=dtype)
    tensor_names = list(tensor_shapes)
    client_masks = {}
    for name, shape in tensor_shapes.items():
        keep = method.client_mask(name, tuple(shape), client_ids)
        if keep is not None:
            client_masks[name] = keep.to(device)
    return RoundPlan(round=t, sampled=sampled, client_ids=client_ids, rows=torch.from_numpy(np.stack(rows)),
                     masks=torch.from_numpy(np.stack(masks)), trained=[n for n in tensor_names if method.trained(n, t)],
                     shared=[n for n in tensor_names if method.shared(n, t)],
                     client_local=[n for n in tensor_names if method.client_local(n, t)], expected_batch=expected,
                     num_clients=num_clients, local_steps=local_steps, lrs=tuple(f.lr for f in federations),
                     client_masks=client_masks)


def index_rows(data, rows, device):
    """(inputs without labels, labels) of the given dataset rows, on `device`."""
    return {k: v[rows].to(device, non_blocking=True) for k, v in data.items() if k != "labels"}, \
        data["labels"][rows].to(device)
