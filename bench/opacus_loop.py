"""Benchmark baseline: "Opacus + peft, one client at a time". Same semantics as the private case of
fedsim.reference.run_reference (K Poisson-sampled DP-SGD steps per sampled client, FedAvg weighted by
client size), but clipping/noise/sampling are done by Opacus 1.6, so its random draws differ.

grad_sample_mode: "hooks" (default; Opacus' per-layer grad samplers cover the nn.Linear modules inside
peft's LoRA layers and the head, the only trainable modules) or "ghost" (fast gradient clipping, no
per-sample gradients materialised). "functorch" also works but is slower.
"""
import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.reference import build_model, make_optimizer
from fedsim.rng import torch_generator
from fedsim.sampling import sample_clients


def run_opacus_clients(make_model, train, partitions, initial_global, cfg, grad_sample_mode="hooks"):
    """Returns (final global state {canonical name: tensor}, history [{round, clients, loss}])."""
    model, params, trainable = build_model(make_model, cfg)
    for m in model.modules():  # Opacus insists on train mode; keep it dropout-free like the reference
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    glob = {n: p.detach().clone() for n, p in params.items()}
    glob.update({n: v.detach().clone().float() for n, v in initial_global.items()})
    keys = list(train)
    history = []
    for t in range(cfg.rounds):
        clients = sample_clients(len(partitions), cfg.client_fraction, cfg.seed, t)
        sums = {n: torch.zeros_like(glob[n]) for n in trainable}
        total, losses = 0, []
        for c in clients:
            part = torch.as_tensor(np.asarray(partitions[int(c)]), dtype=torch.long)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(glob[n])
            gen = torch_generator(cfg.seed, "opacus", t, int(c))
            # Opacus samples with rate 1/len(loader) = batch_size/n (approximately q).
            loader = DataLoader(TensorDataset(*[train[k][part] for k in keys]),
                                batch_size=max(1, round(cfg.dp_sample_rate * len(part))), generator=gen)
            out = PrivacyEngine().make_private(
                module=model, optimizer=make_optimizer([params[n] for n in trainable], cfg), data_loader=loader,
                noise_multiplier=cfg.dp_noise_multiplier, max_grad_norm=cfg.dp_max_grad_norm,
                poisson_sampling=True, grad_sample_mode=grad_sample_mode, criterion=nn.CrossEntropyLoss(),
                noise_generator=gen)
            if grad_sample_mode == "ghost":
                dp_model, opt, criterion, dp_loader = out
            else:
                (dp_model, opt, dp_loader), criterion = out, nn.CrossEntropyLoss()
            steps = 0
            while steps < cfg.local_steps:
                for tensors in dp_loader:
                    batch = dict(zip(keys, tensors))
                    labels = batch.pop("labels")
                    if len(labels):                 # per-batch dynamic padding, as a collator does
                        T = int(batch["attention_mask"].sum(1).max())
                        batch = {k: v[:, :T] for k, v in batch.items()}
                    if len(labels) == 0:  # HF BERT cannot run a 0-row batch: Opacus' noise-only step by hand
                        for n in trainable:
                            noise = torch.normal(0.0, opt.noise_multiplier * opt.max_grad_norm,
                                                 params[n].shape, generator=gen)
                            params[n].grad = noise / opt.expected_batch_size
                        opt.original_optimizer.step()
                        opt.original_optimizer.zero_grad()
                    else:
                        loss = criterion(dp_model(**batch).logits, labels)
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                        losses.append(loss.item())
                    steps += 1
                    if steps == cfg.local_steps:
                        break
            dp_model.to_standard_module()  # remove Opacus hooks and per-sample attributes
            for n in trainable:
                sums[n] += len(part) * params[n].detach()
            total += len(part)
        for n in trainable:
            glob[n] = sums[n] / total
        history.append({"round": t, "clients": [int(c) for c in clients], "loss": float(np.mean(losses)) if losses else float("nan")})
    return {n: v.clone() for n, v in glob.items()}, history
