"""Optimizers over stacked tensors [R, ...].

SGD and AdamW are elementwise, so one update of a stacked tensor is exactly R per-client optimizers
(torch.optim.SGD / AdamW semantics, same formulas). The learning rate is per replica ([R]) so
learning-rate variants can share one pass. `rows` selects the replica chunk being stepped.
"""
import torch


def _per_replica(v, like):
    return v.view(-1, *([1] * (like.dim() - 1)))


class StackedSGD:
    def __init__(self, lr, momentum=0.0, weight_decay=0.0):
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.state = {}

    def reset(self):
        self.state = {}

    @torch.no_grad()
    def step(self, params, grads, rows=slice(None)):
        """params/grads: {name: tensor}; params are full [R, ...] stacks, grads are [Rc, ...] for `rows`."""
        lr = self.lr[rows]
        for name, g in grads.items():
            p = params[name][rows]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                key = (name, rows.start, rows.stop)
                buf = self.state.get(key)
                if buf is None:
                    buf = self.state[key] = g.clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.sub_(_per_replica(lr, p) * g)


class StackedAdamW:
    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state = {}

    def reset(self):
        self.state = {}

    @torch.no_grad()
    def step(self, params, grads, rows=slice(None)):
        """torch.optim.AdamW's formula, p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), written
        in place into one scratch tensor kept with the moments: full fine-tuning steps stacks of hundreds of
        MB, where every fresh temporary costs page faults that took as long as the arithmetic."""
        b1, b2 = self.betas
        lr = self.lr[rows]
        for name, g in grads.items():
            p = params[name][rows]
            key = (name, rows.start, rows.stop)
            if key not in self.state:
                self.state[key] = [0, torch.zeros_like(g), torch.zeros_like(g), torch.empty_like(g)]
            st = self.state[key]
            st[0] += 1
            t, m, v, step = st
            lr_r = _per_replica(lr, p)
            if self.weight_decay:
                p.mul_(1 - lr_r * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            torch.sqrt(v, out=step).div_((1 - b2 ** t) ** 0.5).add_(self.eps)
            torch.div(m, step, out=step).mul_(lr_r / (1 - b1 ** t))
            p.sub_(step)


def make_optimizer(cfg, lr):
    """cfg: the config's optimizer section (name, momentum, weight_decay, betas, eps); lr: [R] tensor."""
    name, kw = cfg["name"], cfg
    if name == "sgd":
        return StackedSGD(lr, momentum=kw.get("momentum", 0.0), weight_decay=kw.get("weight_decay", 0.0))
    if name == "adamw":
        return StackedAdamW(lr, betas=tuple(kw.get("betas", (0.9, 0.999))), eps=kw.get("eps", 1e-8),
                            weight_decay=kw.get("weight_decay", 0.0))
    raise ValueError(f"unknown optimizer '{name}'; valid: sgd, adamw")
