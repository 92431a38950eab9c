"""Communication ledger: exact bytes up and down, per federation, per round, cumulative."""
from dataclasses import dataclass, field


@dataclass
class Ledger:
    num_federations: int
    rounds: list = field(default_factory=list)       # one dict per round

    def record(self, round_idx, clients_per_federation, up_per_client, down_per_client):
        """up/down_per_client: bytes each participating client sends / receives this round: one number (every
        client the same) or one per replica (federation-major, clients_per_federation each; HetLoRA's ranks)."""
        def per_federation(x):
            if isinstance(x, (list, tuple)):
                m = clients_per_federation
                return [sum(x[f * m:(f + 1) * m]) for f in range(self.num_federations)]
            return [clients_per_federation * x] * self.num_federations
        self.rounds.append(dict(round=round_idx, clients=clients_per_federation,
                                up_per_client=up_per_client, down_per_client=down_per_client,
                                up=per_federation(up_per_client), down=per_federation(down_per_client)))

    def cumulative(self, key="up"):
        """Bytes sent so far by each federation: [F]."""
        return [sum(r[key][f] for r in self.rounds) for f in range(self.num_federations)]

    def state_dict(self):
        return {"num_federations": self.num_federations, "rounds": list(self.rounds)}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["num_federations"], list(d["rounds"]))
