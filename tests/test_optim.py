"""Stacked optimizers == one torch.optim optimizer per replica (the engine tests check them only inside runs)."""
import pytest
import torch

from fedsim.optim import make_optimizer


@pytest.mark.parametrize("cfg", [
    {"name": "adamw", "weight_decay": 0.0},
    {"name": "adamw", "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
    {"name": "sgd", "momentum": 0.9, "weight_decay": 0.01},
])
def test_stacked_optimizer_equals_torch_per_replica(cfg):
    torch.manual_seed(0)
    R, shape, steps = 4, (5, 3), 4
    lrs = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2])
    stacked = {"w": torch.randn(R, *shape)}
    singles = [torch.nn.Parameter(stacked["w"][r].clone()) for r in range(R)]
    kw = {k: v for k, v in cfg.items() if k != "name"}
    ref = [(torch.optim.AdamW if cfg["name"] == "adamw" else torch.optim.SGD)([p], lr=lrs[r].item(), **kw)
           for r, p in enumerate(singles)]
    opt = make_optimizer(cfg, lrs)
    for _ in range(steps):
        grads = torch.randn(R, *shape)
        for rows in (slice(0, 2), slice(2, 4)):          # replica chunks step separately, as in the engine
            opt.step(stacked, {"w": grads[rows]}, rows=rows)
        for r, (p, o) in enumerate(zip(singles, ref)):
            p.grad = grads[r].clone()
            o.step()
    for r, p in enumerate(singles):
        torch.testing.assert_close(stacked["w"][r], p.detach(), rtol=1e-6, atol=1e-7)
