"""Server optimizers (Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, arXiv 2003.00295; FedAvgM: Hsu, Qi, Brown, arXiv 1909.06335).

The server treats the round's aggregate as a pseudo-gradient: with x the global tensor the round started from
and delta = aggregate - x (FedAvg's update, or whatever the method's aggregate is),

    FedAvg      x <- x + lr delta
    FedAvgM     m <- beta1 m + delta;                                    x <- x + lr m
    FedAdagrad  m <- beta1 m + (1 - beta1) delta;  v <- v + delta^2;        x <- x + lr m / (sqrt(v) + tau)
    FedAdam     ...                                v <- beta2 v + (1 - beta2) delta^2
    FedYogi     ...                                v <- v - (1 - beta2) delta^2 sign(v - delta^2)

elementwise per tensor and federation, with m = 0 and v = tau^2 at the start (Reddi et al.'s Algorithm 2:
no bias correction, v_{-1} >= tau^2). Orthogonal to the method: it steps whatever the method shares and
aggregates (A, B and the head of a LoRA method; every weight under full fine-tuning). Tensors a client keeps
(client-local) are never aggregated, so never stepped.
Interpretations:
- lr is per federation ([F]; `server.lr` is sweepable), the betas and tau are the run's.
- A tensor whose shape changes (SA-FedLoRA's rank annealing, SLoRA's switch from the sparse to the LoRA stage)
  restarts its moments: the old ones describe another parameterisation.
- The update is written aggregate + (lr u - delta), which is x + lr u: at lr 1 without momentum it returns the
  aggregate bit for bit (x + (aggregate - x) would not), so FedAvg is exactly FedAvg.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ServerOptParams:
    momentum: float = 0.9    # FedAvgM's beta; FedAdagrad's, FedAdam's and FedYogi's beta1 (Reddi et al.: 0.9)
    beta2: float = 0.99      # FedAdam's and FedYogi's second-moment decay (Reddi et al.: 0.99)
    tau: float = 1e-3        # adaptivity: v starts at tau^2 and tau is added to sqrt(v) (Reddi et al.: 1e-3)


class ServerOptimizer:
    """Plain FedAvg (x <- x + lr delta); subclasses say how delta becomes the step direction."""
    name = "fedavg"

    def __init__(self, params: ServerOptParams, lr):
        self.params, self.lr = params, lr           # lr: [F] tensor, one server learning rate per federation
        self.state = {}                             # {name: {moment: [F, *shape]}}

    def direction(self, name, delta):
        return delta

    @torch.no_grad()
    def step(self, global_state, aggregated, names):
        """New global state: aggregated, with the tensors in `names` moved by this optimizer instead."""
        new = dict(aggregated)
        self.state = {n: s for n, s in self.state.items() if n in names}     # tensors no longer shared (a stage
        for name in names:                                                   # switch) leave their moments
            x, agg = global_state.get(name), aggregated[name]
            if x is None or x.shape != agg.shape:
                self.state.pop(name, None)          # a new parameterisation: start its moments over
                continue
            delta = agg - x
            lr = self.lr.to(agg).view(-1, *([1] * (agg.dim() - 1)))
            new[name] = agg + (lr * self.direction(name, delta) - delta)
        return new

    def state_dict(self):
        return {n: {k: v.cpu() for k, v in s.items()} for n, s in self.state.items()}

    def load_state_dict(self, d, device):
        self.state = {n: {k: v.to(device) for k, v in s.items()} for n, s in d.items()}


class FedAvgM(ServerOptimizer):
    name = "fedavgm"

    def direction(self, name, delta):
        s = self.state.setdefault(name, {"m": torch.zeros_like(delta)})
        s["m"] = self.params.momentum * s["m"] + delta
        return s["m"]


class _Adaptive(ServerOptimizer):
    def second_moment(self, v, delta_sq):
        raise NotImplementedError

    def direction(self, name, delta):
        p = self.params
        s = self.state.setdefault(name, {"m": torch.zeros_like(delta), "v": torch.full_like(delta, p.tau ** 2)})
        s["m"] = p.momentum * s["m"] + (1 - p.momentum) * delta
        s["v"] = self.second_moment(s["v"], delta * delta)
        return s["m"] / (s["v"].sqrt() + p.tau)


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def second_moment(self, v, delta_sq):
        return v + delta_sq


class FedAdam(_Adaptive):
    name = "fedadam"

    def second_moment(self, v, delta_sq):
        return self.params.beta2 * v + (1 - self.params.beta2) * delta_sq


class FedYogi(_Adaptive):
    name = "fedyogi"

    def second_moment(self, v, delta_sq):
        return v - (1 - self.params.beta2) * delta_sq * torch.sign(v - delta_sq)


SERVER_OPTIMIZERS = {c.name: c for c in (ServerOptimizer, FedAvgM, FedAdagrad, FedAdam, FedYogi)}


def validate_server(name, lr, momentum, beta2, tau):
    """ValueError naming the key and the fix for an unusable `server` config section."""
    checks = [(name in SERVER_OPTIMIZERS, f"unknown server.optimizer '{name}'; valid: {sorted(SERVER_OPTIMIZERS)} "
                                          f"(fedavg: plain averaging)"),
              (lr > 0, f"server.lr must be > 0 (got {lr}); 1 is FedAvg's step, Reddi et al. tune FedAdam's over 1e-3..1"),
              (0 <= momentum < 1, f"server.momentum must be in [0, 1) (got {momentum}); try 0.9"),
              (0 <= beta2 < 1, f"server.beta2 must be in [0, 1) (got {beta2}); try 0.99"),
              (tau > 0, f"server.tau must be > 0 (got {tau}); Reddi et al. use 1e-3")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def make_server_optimizer(name, lr, **params):
    """The server optimizer `name` (see SERVER_OPTIMIZERS) with per-federation learning rates lr [F]."""
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server.optimizer '{name}'; valid: {sorted(SERVER_OPTIMIZERS)}")
    return SERVER_OPTIMIZERS[name](ServerOptParams(**params), lr)
