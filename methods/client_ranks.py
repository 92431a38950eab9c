"""Per-client LoRA ranks (HetLoRA, FLoRA): client i of a federation trains the first r_i <= r slots of the global
adapters (rows of A [r, in], columns of B [out, r]); the engine zeroes the rest on receipt and in every gradient
(fedsim.interface.Method.client_mask).

r_i is drawn once, uniformly from `choices`, keyed by the federation's seed and the client id (never by the
federation's position in a pass). A method may lower it later (HetLoRA's self-pruning): `lower` records the new
rank per federation index and client id, as method state.
"""
import torch

from fedsim.rng import numpy_rng


def check_rank_choices(method, choices, rank):
    """The default [r/4, r/2, r] of the global rank r, or the given choices: integers in 1..r."""
    resolved = choices or sorted({max(1, rank // 4), max(1, rank // 2), rank})
    bad = [c for c in resolved if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= rank]
    if not resolved or bad:
        raise ValueError(f"method {method} rank_choices {choices} must be integers in 1..{rank} (the global rank "
                         f"lora.rank={rank} is the largest a client may have); got {bad or 'none'}")
    return list(resolved)


def is_factor(name):
    return name.endswith((".lora_A", ".lora_B"))


class ClientRanks:
    def __init__(self, choices):
        self.choices = list(choices)
        self.seeds = []
        self.lowered = {}                    # (federation index, client id) -> rank after pruning

    def rank(self, federation, client):
        """r_i of a client of the federation at this index."""
        if (federation, client) in self.lowered:
            return self.lowered[(federation, client)]
        rng = numpy_rng(self.seeds[federation], "hetlora_rank", client)    # the key HetLoRA's results were drawn with
        return int(self.choices[rng.integers(len(self.choices))])

    def lower(self, federation, client, rank):
        self.lowered[(federation, client)] = int(rank)

    def slots(self, client_ids, width):
        """[len(client_ids), width] bool: the slots each client holds."""
        ranks = torch.tensor([self.rank(f, c) for f, c in client_ids])
        return torch.arange(width)[None, :] < ranks[:, None]

    def mask(self, name, shape, client_ids):
        """Method.client_mask: [len(client_ids), *shape] 0/1 for A [r, in] and B [out, r]; None for the rest."""
        if not is_factor(name):
            return None
        if name.endswith(".lora_A"):
            return self.slots(client_ids, shape[0])[:, :, None].expand(-1, *shape)
        return self.slots(client_ids, shape[1])[:, None, :].expand(-1, *shape)

    def bytes_per_slot(self, global_state):
        """Bytes of one rank slot of every adapter (a row of A plus a column of B), per replica."""
        factors = {n: t[0] for n, t in global_state.items() if is_factor(n)}
        rank = next(t.shape[0] for n, t in factors.items() if n.endswith(".lora_A"))
        return sum(t.numel() * t.element_size() for t in factors.values()) // rank

    def state_dict(self):
        return {"lowered": [[f, c, r] for (f, c), r in sorted(self.lowered.items())]}

    def load_state_dict(self, d):
        self.lowered = {(f, c): r for f, c, r in d.get("lowered", [])}
