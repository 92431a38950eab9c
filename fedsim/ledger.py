"""Communication ledger: exact bytes up and down, per federation, per round, cumulative."""
from dataclasses import dataclass, field


@dataclass
class Ledger:
    num_federations: int
    rounds: list = field(default_factory=list)       # one dict per round

    def record(self, round_idx, clients_per_federation, up_per_client, down_per_client):
        self.rounds.append(dict(round=round_idx, clients=clients_per_federation,
                                up_per_client=up_per_client, down_per_client=down_per_client,
                                up=clients_per_federation * up_per_client,
                                down=clients_per_federation * down_per_client))

    def cumulative(self, key="up"):
        """Bytes sent so far by one federation (every federation sends the same amount)."""
        return sum(r[key] for r in self.rounds)

    def state_dict(self):
        return {"num_federations": self.num_federations, "rounds": list(self.rounds)}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["num_federations"], list(d["rounds"]))
