"""Deliberately plain sequential reference for the engine: a Python loop over clients, each a normal HF
model with peft LoRA trained by a standard torch loop, then FedAvg over the federated tensors.

Shares nothing with the engine except the seeded helpers in fedsim.sampling and fedsim.rng.

Canonical names (the engine uses the same): for every adapted nn.Linear `name` (named_modules order of
the unwrapped HF model) `name.lora_A` [r, in] then `name.lora_B` [out, r]; then every nn.Linear under
`classifier`: `name.weight`, `name.bias`. With full_finetune: the HF model's own named_parameters().
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedsim.rng import torch_generator
from fedsim.sampling import fixed_batches, poisson_batches, sample_clients

HEAD = "classifier"


@dataclass
class ReferenceConfig:
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # "sgd" | "adamw"
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    client_fraction: float = 1.0
    seed: int = 0                           # the federation's seed: keys every random stream
    lora_r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple | str = ("query", "value")  # or "all-linear"
    train_A: bool = True  # False = FFA-LoRA (A frozen at its initial value)
    train_head: bool = True
    full_finetune: bool = False  # no LoRA, every parameter trainable (FedAvg-FFT)
    dp_max_grad_norm: float | None = None  # None = non-private
    dp_noise_multiplier: float = 0.0
    dp_sample_rate: float | None = None  # Poisson q
    dp_max_batch: int | None = None
    dp_head_share: float | None = None  # clip the head to C sqrt(share) and the rest to C sqrt(1 - share)
    prox_mu: float = 0.0  # FedProx: add mu * (w - w_global) to every local gradient
    scaffold: bool = False  # SCAFFOLD (option II control variates), written out plainly below
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadagrad | fedadam | fedyogi (Reddi et al. 2021)
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3


def _is_head(name):
    return name == HEAD or name.startswith(HEAD + ".")


def adapted_module_names(model, target_modules):
    """Linear modules that get LoRA, in named_modules order. `model` is the plain HF model;
    "all-linear" = every Linear except the classifier head (peft's meaning for SEQ_CLS)."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _is_head(name):
            continue
        if target_modules == "all-linear" or any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    return names


def canonical_names(model, cfg):
    """All federated tensor names in canonical order (model: the plain HF model)."""
    if cfg.full_finetune:
        return [n for n, _ in model.named_parameters()]
    names = []
    for name in adapted_module_names(model, cfg.target_modules):
        names += [f"{name}.lora_A", f"{name}.lora_B"]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _is_head(name):
            names += [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])
    return names


def canonical_trainable_names(model, cfg):
    """The trained subset of canonical_names, in canonical order."""
    names = canonical_names(model, cfg)
    if cfg.full_finetune:
        return names
    keep = lambda n: (n.endswith(".lora_A") and cfg.train_A) or n.endswith(".lora_B") or (
        _is_head(n) and cfg.train_head)
    return [n for n in names if keep(n)]


def build_model(make_model, cfg):
    """(model to run, {canonical name: Parameter}, trainable canonical names). LoRA via peft."""
    hf = make_model()
    names, trainable = canonical_names(hf, cfg), canonical_trainable_names(hf, cfg)
    if cfg.full_finetune:
        model, prefix = hf, ""
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=adapted_module_names(hf, cfg.target_modules))
        model, prefix = get_peft_model(hf, lora), "base_model.model."
    model.eval()
    all_params = dict(model.named_parameters())
    peft_key = lambda n: prefix + n + (".default.weight" if n.endswith((".lora_A", ".lora_B")) else "")
    params = {n: all_params[peft_key(n)] for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in trainable:
        params[n].requires_grad_(True)
    return model, params, trainable


def make_optimizer(params, cfg):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def _additive_mask(attention_mask):
    """[b, T] 0/1 -> [b, 1, 1, T] additive float mask (HF's 2D-mask path uses data-dependent control
    flow that vmap cannot trace; a ready 4D mask is passed through as-is)."""
    return torch.where(attention_mask.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]


def per_sample_grads(model, trainable, batch, with_loss=False):
    """Per-sample gradients of the per-sample cross-entropy: {name: [b, *shape]} for the tensors in
    `trainable` (keyed by the model's own parameter names). with_loss: also return losses [b]."""

    def loss_fn(params, one):
        one = {k: v.unsqueeze(0) for k, v in one.items()}
        labels = one.pop("labels")
        if "attention_mask" in one:
            one["attention_mask"] = _additive_mask(one["attention_mask"])
        logits = functional_call(model, params, args=(), kwargs=one).logits
        loss = F.cross_entropy(logits, labels)
        return loss, loss

    params = {n: p.detach() for n, p in trainable.items()}
    # attention through SDPA's math kernel: on an AMD EPYC host, vmap's per-sample fallback around the CPU
    # flash-attention kernel returned float64 per-sample gradients off by up to 7e-3 (tests/test_stacked.py),
    # while the math kernel agrees with the engine's to 1e-9
    with sdpa_kernel([SDPBackend.MATH]):
        grads, losses = vmap(grad(loss_fn, has_aux=True), in_dims=(None, 0))(params, batch)
    return (grads, losses) if with_loss else grads


def _rows(train, part, positions):
    """One batch, cut to its longest real row (per-batch dynamic padding, as a collator does; the math is
    unchanged: padding is masked)."""
    idx = torch.as_tensor(part[positions], dtype=torch.long)
    batch = {k: v[idx] for k, v in train.items()}
    T = max(1, int(batch["attention_mask"].sum(1).max()))
    return {k: v[:, :T] if v.dim() == 2 else v for k, v in batch.items()}


def _plain_step(model, batch, opt, correct):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = F.cross_entropy(model(**inputs).logits, batch["labels"])
    loss.backward()
    correct()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _private_step(model, params, names, batch, mask, n, t, c, s, cfg):
    """DP-SGD step: clip each sample's flattened gradient to C, add sigma*C noise, divide by q*n.
    `names` maps trainable canonical names (canonical order) to the model's own parameter names."""
    C, sigma, q = cfg.dp_max_grad_norm, cfg.dp_noise_multiplier, cfg.dp_sample_rate
    grads, losses = per_sample_grads(model, {own: params[cn] for cn, own in names.items()}, batch, with_loss=True)
    mask = torch.as_tensor(mask)
    g = torch.cat([grads[own].reshape(len(mask), -1) for own in names.values()], dim=1)
    g[~mask] = 0.0
    if cfg.dp_head_share is None:            # joint clipping: one norm over every trained tensor
        factor = torch.clamp(C / (g.norm(dim=1) + 1e-6), max=1.0)
        clipped = factor[:, None] * g
    else:                                    # per group: head to C sqrt(share), the rest to C sqrt(1 - share)
        head = torch.cat([torch.full((params[cn].numel(),), _is_head(cn)) for cn in names])
        shares = {True: cfg.dp_head_share, False: 1.0 - cfg.dp_head_share}
        if head.all() or not head.any():
            shares = {bool(head[0]): 1.0}
        clipped = torch.zeros_like(g)
        for is_head, share in shares.items():
            cols = head == is_head
            factor = torch.clamp(C * share ** 0.5 / (g[:, cols].norm(dim=1) + 1e-6), max=1.0)
            clipped[:, cols] = factor[:, None] * g[:, cols]
    noise = torch.randn(g.shape[1], generator=torch_generator(cfg.seed, "noise", t, c, s))
    flat = (clipped.sum(0) + sigma * C * noise) / (q * n)
    for cn, piece in zip(names, flat.split([params[cn].numel() for cn in names])):
        params[cn].grad = piece.view_as(params[cn]).clone()
    return losses[mask].mean().item() if mask.any() else float("nan")


def _server_step(cfg, state, x, average):
    """The server optimizer's new global tensor from the old one x and the clients' average (Reddi et al. 2021,
    Algorithm 2; FedAvgM: m = beta m + delta)."""
    if cfg.server_optimizer == "fedavg":
        return x + cfg.server_lr * (average - x) if cfg.server_lr != 1 else average
    delta, b1, b2, tau = average - x, cfg.server_momentum, cfg.server_beta2, cfg.server_tau
    if cfg.server_optimizer == "fedavgm":
        state["m"] = b1 * state.get("m", 0) + delta
        return x + cfg.server_lr * state["m"]
    state["m"] = b1 * state.get("m", 0) + (1 - b1) * delta
    v = state.get("v", torch.full_like(x, tau ** 2))
    if cfg.server_optimizer == "fedadagrad":
        v = v + delta ** 2
    elif cfg.server_optimizer == "fedadam":
        v = b2 * v + (1 - b2) * delta ** 2
    elif cfg.server_optimizer == "fedyogi":
        v = v - (1 - b2) * delta ** 2 * torch.sign(v - delta ** 2)
    else:
        raise ValueError(f"unknown server optimizer {cfg.server_optimizer!r}")
    state["v"] = v
    return x + cfg.server_lr * state["m"] / (v.sqrt() + tau)


def _mean(xs):
    xs = [x for x in xs if x == x]  # drop NaN (an empty Poisson batch has no loss)
    return sum(xs) / len(xs) if xs else float("nan")


def run_reference(make_model, train, partitions, initial_global, cfg):
    """Sequential FedAvg. Returns (final global state {canonical name: float32 CPU tensor} for every
    canonical name, history [{round, clients, loss, client_losses}])."""
    model, params, trainable = build_model(make_model, cfg)
    unknown = set(initial_global) - set(params)
    if unknown:
        raise KeyError(f"initial_global has non-canonical names: {sorted(unknown)[:5]}")
    glob = {n: p.detach().clone() for n, p in params.items()}
    glob.update({n: v.detach().clone().to(params[n].dtype) for n, v in initial_global.items()})
    private = cfg.dp_max_grad_norm is not None
    own = {id(p): name for name, p in model.named_parameters()}
    model_names = {n: own[id(params[n])] for n in trainable}
    history = []
    zeros = lambda: {n: torch.zeros_like(glob[n]) for n in trainable}  # noqa: E731
    server_c, client_c = zeros(), {}         # SCAFFOLD's control variates: the server's, each client's
    server_state = {}                        # the server optimizer's moments per tensor
    for t in range(cfg.rounds):
        clients = sample_clients(len(partitions), cfg.client_fraction, cfg.seed, t)
        sums = zeros()
        total, client_losses = 0, []
        variate_change = zeros()
        for c in clients:
            c = int(c)
            part = np.asarray(partitions[c])
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(glob[n])
            opt = make_optimizer([params[n] for n in trainable], cfg)
            own_c = client_c.get(c) or zeros()

            @torch.no_grad()
            def correct():
                """FedProx's proximal gradient, added to the (clipped, noised) gradient."""
                for n in trainable:
                    if cfg.prox_mu:
                        params[n].grad += cfg.prox_mu * (params[n] - glob[n])

            @torch.no_grad()
            def drift():
                """SCAFFOLD's correction, a move of its own after the optimizer's step: y -= lr (c - c_i)."""
                for n in trainable:
                    if cfg.scaffold:
                        params[n] -= cfg.lr * (server_c[n] - own_c[n])
            losses = []
            if private:
                pos, mask = poisson_batches(len(part), cfg.dp_sample_rate, cfg.dp_max_batch, cfg.local_steps,
                                            cfg.seed, t, c)
                for s in range(cfg.local_steps):
                    batch = _rows(train, part, pos[s])
                    losses.append(_private_step(model, params, model_names, batch, mask[s], len(part), t, c, s, cfg))
                    correct()
                    opt.step()
                    opt.zero_grad()
                    drift()
            else:
                pos = fixed_batches(len(part), cfg.batch_size, cfg.local_steps, cfg.seed, t, c)
                for s in range(cfg.local_steps):
                    losses.append(_plain_step(model, _rows(train, part, pos[s]), opt, correct))
                    drift()
            for n in trainable:
                sums[n] += len(part) * params[n].detach()
                if cfg.scaffold:               # option II: c_i+ = c_i - c + (x - y_i) / (K lr)
                    new_c = own_c[n] - server_c[n] + (glob[n] - params[n].detach()) / (cfg.local_steps * cfg.lr)
                    variate_change[n] += new_c - own_c[n]
                    own_c[n] = new_c
            client_c[c] = own_c
            total += len(part)
            client_losses.append(_mean(losses))
        for n in trainable:
            server_c[n] = server_c[n] + variate_change[n] / len(partitions)
            glob[n] = _server_step(cfg, server_state.setdefault(n, {}), glob[n], sums[n] / total)
        history.append({"round": t, "clients": [int(c) for c in clients],
                        "loss": _mean(client_losses),
                        "client_losses": client_losses})
    return {n: v.clone() for n, v in glob.items()}, history
