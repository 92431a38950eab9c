"""Differential privacy: per-sample clipping + Gaussian noise for all replicas at once, and accounting.

clip_and_noise is DP-SGD's aggregation step (Opacus convention) batched over the replica dimension:
    out[r] = (sum_n min(1, C_r / (||g_rn|| + 1e-6)) * g_rn + sigma_r * C_r * z_r) / B_r
Accounting is delegated to Opacus accountants (RDP or PRV), never re-implemented here.

epsilon = math.inf (config `dp.epsilon: .inf`) is the matched no-noise column: the same schedule (Poisson
sampling at q, per-sample clipping at C, division by the expected batch B) with sigma = 0, so
    out[r] = sum_n min(1, C_r / (||g_rn|| + 1e-6)) * g_rn / B_r        (clip only, no accountant call).
Strict JSON has no Infinity: files record it through json_epsilon ("inf"), with noise_multiplier 0.
"""
import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from fedsim.rng import derive_seed, torch_generator

ACCOUNTANTS = ("rdp", "prv")
# get_noise_multiplier searches sigma up to 1e6; anything past this is noise that swamps any gradient,
# so we report the target as unreachable rather than silently training on pure noise.
MAX_USEFUL_SIGMA = 1e3
# RDP orders searched for the tightest epsilon. Opacus' default stops at 63, and DP federated runs (few
# large steps, q near 1/10, sigma near 1) often want a larger order: Opacus then warns "Optimal order is
# the largest alpha" and overstates epsilon. Orders up to 4096 cover every sigma up to MAX_USEFUL_SIGMA's
# probe; more orders only cost a few ms per evaluation.
RDP_ORDERS = tuple([1 + x / 20 for x in range(1, 180)] + list(range(10, 256))
                   + [256, 320, 384, 448, 512, 640, 768, 896, 1024, 1536, 2048, 3072, 4096])


def _orders(accountant):
    """Keyword arguments of the accountant's get_epsilon: the wide RDP order grid for RDP."""
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


def _per_replica(x, R: int, device, dtype=torch.float32) -> torch.Tensor:
    """A python float or a [R] tensor -> [R] tensor on device."""
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.expand(R).contiguous() if t.dim() == 0 else t.reshape(R)


def clip_and_noise(grads: torch.Tensor, max_grad_norm, noise_multiplier, expected_batch_size, noise_keys,
                   sq_norms: Optional[torch.Tensor] = None, backend: str = "auto", groups=None) -> torch.Tensor:
    """Clip per-sample grads [R, b, D], sum per replica, add Gaussian noise, divide by expected batch -> [R, D].

    max_grad_norm / noise_multiplier / expected_batch_size: float or float tensor [R].
    noise_keys: R tuples; replica r's noise is torch.randn(D, generator=torch_generator(*noise_keys[r]))
    on the torch path, and Philox seeded with derive_seed(*noise_keys[r]) in the Triton kernel (the two
    paths agree in distribution, not bitwise). sq_norms: optional precomputed per-sample squared norms [R, b].
    Zero rows (masked / padded samples) contribute exactly zero.

    groups: per-group clipping (clip_groups): ((lo, hi), share) column ranges covering [0, D) with shares
    of the squared budget summing to 1. Group g of each sample is clipped to C_g = C sqrt(share_g), so the
    clipped sample's norm is at most sqrt(sum_g C_g^2) = C: the sensitivity, the noise sigma * C * z and the
    accounting are those of joint clipping at C. sq_norms is then [R, b, G]. Torch path only.
    """
    R, b, D = grads.shape
    assert len(noise_keys) == R, f"need one noise key per replica ({R}), got {len(noise_keys)}"
    if backend == "auto":
        backend = "triton" if grads.is_cuda and groups is None else "torch"
    C = _per_replica(max_grad_norm, R, grads.device, grads.dtype)
    sigma = _per_replica(noise_multiplier, R, grads.device, grads.dtype)
    B = _per_replica(expected_batch_size, R, grads.device, grads.dtype)
    if backend == "triton":
        if groups is not None:
            raise ValueError("the Triton kernel clips jointly; per-group clipping runs on the torch backend")
        from fedsim.triton_clip import fused_clip_and_noise  # lazy: CPU-only code never imports triton
        seeds = torch.tensor([derive_seed(*k) for k in noise_keys], dtype=torch.int64, device=grads.device)
        return fused_clip_and_noise(grads, C, sigma, B, seeds, sq_norms)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'torch' or 'triton'")

    if groups is None:
        norms = grads.norm(dim=-1) if sq_norms is None else sq_norms.to(grads.dtype).sqrt()
        factor = (C[:, None] / (norms + 1e-6)).clamp(max=1.0)
        out = torch.bmm(factor.unsqueeze(1), grads).squeeze(1)  # [R, D]
    else:
        out = torch.empty(R, D, device=grads.device, dtype=grads.dtype)
        for g, ((lo, hi), share) in enumerate(groups):
            part = grads[:, :, lo:hi]
            norms = part.norm(dim=-1) if sq_norms is None else sq_norms[:, :, g].to(grads.dtype).sqrt()
            factor = (C[:, None] * math.sqrt(share) / (norms + 1e-6)).clamp(max=1.0)
            out[:, lo:hi] = torch.bmm(factor.unsqueeze(1), part).squeeze(1)
    sig_cpu, C_cpu = sigma.cpu(), C.cpu()
    for r in range(R):
        if sig_cpu[r] > 0:
            # Drawn on CPU so the stream is the same on every device (the sequential reference relies on it).
            z = torch.randn(D, generator=torch_generator(*noise_keys[r]))
            out[r] += (z * sig_cpu[r] * C_cpu[r]).to(grads.device)
    return out / B[:, None]


def clip_groups(offsets, head_names, head_share):
    """Column groups of a flat per-sample gradient for per-group clipping: (((lo, hi), share), ...).

    offsets: {name: (lo, hi)} in canonical order (adapters first, head last); head_names: the head's
    tensor names; head_share: the head's share of the squared clip budget (None: joint clipping -> None).
    A group with no trained tensor (e.g. a frozen head) is left out and its share goes to the other."""
    if head_share is None:
        return None
    head = [offsets[n] for n in offsets if n in head_names]
    rest = [offsets[n] for n in offsets if n not in head_names]
    spans = []
    for ranges, share in ((rest, 1.0 - head_share), (head, head_share)):
        if ranges:
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            if sum(r[1] - r[0] for r in ranges) != hi - lo:
                raise ValueError("per-group clipping needs each group's tensors contiguous in canonical order")
            spans.append([(lo, hi), share])
    if len(spans) == 1:
        spans[0][1] = 1.0
    return tuple((span, share) for span, share in sorted(spans))


# ---------------------------------------------------------------------------------------------- accounting

def validate_dp(epsilon, delta, max_grad_norm, accountant) -> None:
    """Raise ValueError naming the fix for an unusable DP setting (epsilon None = non-private: no checks;
    epsilon math.inf = clip only, sigma = 0: delta, C and the accountant are checked all the same)."""
    if epsilon is None:
        return
    if not epsilon > 0:                      # also NaN
        raise ValueError(f"dp.epsilon must be > 0 (got {epsilon}); use epsilon: null for non-private training "
                         f"or .inf for clipping without noise (sigma = 0)")
    if not 0 < delta < 1:
        raise ValueError(f"dp.delta must be in (0, 1) (got {delta}); a common choice is 1/(number of samples)")
    if not max_grad_norm > 0:
        raise ValueError(f"dp.max_grad_norm must be > 0 (got {max_grad_norm}); try 1.0")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown dp.accountant {accountant!r}; use one of {ACCOUNTANTS}")


def clip_only(epsilon) -> bool:
    """epsilon = infinity: the DP schedule (Poisson sampling, per-sample clipping) with noise multiplier 0."""
    return epsilon is not None and math.isinf(epsilon) and epsilon > 0


def json_epsilon(value):
    """An epsilon as strict JSON holds it: math.inf -> "inf" (no bare Infinity); numbers and None unchanged."""
    return "inf" if isinstance(value, float) and math.isinf(value) and value > 0 else value


def _check_schedule(sample_rate, steps):
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate q must be in (0, 1] (got {sample_rate}); q = expected batch / client size")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"number of steps must be a non-negative integer (got {steps})")


@functools.lru_cache(maxsize=None)   # a family's tuning and final runs ask for the same (eps, delta, q, steps):
def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int,   # ~3 s of RDP each
                         accountant: str = "rdp") -> float:
    """Smallest sigma (Opacus' binary search) such that `steps` Poisson-subsampled steps at rate q are
    (eps, delta)-DP. epsilon = math.inf (clip only) and steps = 0 give sigma = 0 without asking an accountant."""
    from opacus.accountants.utils import get_noise_multiplier
    validate_dp(epsilon, delta, 1.0, accountant)
    _check_schedule(sample_rate, steps)
    if steps == 0 or clip_only(epsilon):
        return 0.0
    fix = (f"target epsilon={epsilon} is unreachable with q={sample_rate}, {steps} steps, delta={delta}: "
           "raise epsilon, lower q (smaller expected batch), or lower the number of steps (rounds x local steps)")
    # Opacus' search doubles sigma up to 1e6 and RDP gets slow for huge sigma (~1 min at q=0.5):
    # one evaluation at the largest useful sigma tells an unreachable target up front.
    with _quiet_rdp_orders():         # at the probe's huge sigma even order 4096 may be the best one
        unreachable = epsilon_spent(MAX_USEFUL_SIGMA, sample_rate, steps, delta, accountant) > epsilon
    if unreachable:
        raise ValueError(f"{fix} (even noise multiplier {MAX_USEFUL_SIGMA:g} is not enough)")
    try:
        with _quiet_rdp_orders() if accountant == "prv" else contextlib.nullcontext():
            sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                         steps=int(steps), accountant=accountant, **_orders(accountant))
    except (ValueError, OverflowError, FloatingPointError) as e:
        raise ValueError(f"{fix} ({e})") from e
    if not math.isfinite(sigma) or sigma > MAX_USEFUL_SIGMA:
        raise ValueError(f"{fix} (needs noise multiplier {sigma:.3g} > {MAX_USEFUL_SIGMA:g})")
    return float(sigma)


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon after `steps` Poisson-subsampled Gaussian steps (sigma, q), via an Opacus accountant."""
    from opacus.accountants import create_accountant
    _check_schedule(sample_rate, steps)
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with _quiet_rdp_orders() if accountant == "prv" else contextlib.nullcontext():
        return float(acc.get_epsilon(delta=delta, **_orders(accountant)))


@contextlib.contextmanager
def _quiet_rdp_orders():
    """Silence Opacus' "Optimal order is the largest alpha" warning where it is expected: at the
    MAX_USEFUL_SIGMA probe (only compared with the target, never reported) and inside Opacus' PRV
    accountant (it bounds its discretization domain with RDP at the default orders; the PRV epsilon
    itself does not come from RDP). Anywhere else the warning stays visible: it would mean a reported
    RDP epsilon is looser than it needs to be."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def max_poisson_batch(expected_batch: float, factor: float = 3.0) -> int:
    """Static padded size for Poisson batches of mean mu = expected_batch.

    The batch size is a sum of independent Bernoullis with mean mu (variance <= mu). Bernstein's inequality
    gives P(X >= mu + t) <= exp(-t^2 / (2 (mu + t/3))); choosing t = k sqrt(mu) + k^2/3 (k = factor) makes
    that <= exp(-k^2/2) for every mu. The k^2/3 margin matters for small mu, where the tail is skewed and
    mu + k sqrt(mu) alone undershoots. (Bernstein is loose: for mu=16, k=3 the true overflow odds are ~1e-4.)
    """
    mu = float(expected_batch)
    return max(1, math.ceil(mu + factor * math.sqrt(mu) + factor ** 2 / 3))


@dataclass
class DPConfig:
    epsilon: Optional[float] = None  # None = non-private (no clipping, no noise); math.inf = clip only (sigma 0)
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    max_batch_factor: float = 5.0  # Poisson padding: overflow probability <= exp(-k^2/2) per step
    head_share: Optional[float] = None  # per-group clipping: the head's share of C^2 (None: joint)

    @property
    def private(self) -> bool:
        return self.epsilon is not None

    @property
    def clip_only(self) -> bool:
        return clip_only(self.epsilon)

    def validate(self) -> "DPConfig":
        validate_dp(self.epsilon, self.delta, self.max_grad_norm, self.accountant)
        if not self.max_batch_factor > 0:
            raise ValueError(f"dp.max_batch_factor must be > 0 (got {self.max_batch_factor}); try 3.0")
        return self


# ------------------------------------------------------------------------------- client-level DP (DP-FedAvg)
#
# The protected unit is a client's whole dataset (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
# Recurrent Language Models", ICLR 2018, arXiv 1710.06963). Per round each sampled client's update of the shared
# tensors, delta_i = y_i - x flattened over every shared tensor, is clipped to norm C; the server averages with
# the fixed denominator m (clients per round) and adds Gaussian noise of std sigma C / m to the average:
#     x <- x + (sum_i min(1, C / (||delta_i|| + 1e-6)) delta_i + sigma C z) / m.
# One release per round; a client takes part with probability q = m / N, so the accountant composes `rounds`
# subsampled Gaussian mechanisms at (sigma, q). Clients are drawn as a uniform subset of fixed size m, the
# convention of DP-FedAvg and TensorFlow Federated; the accountant's Poisson analysis at q = m / N is the
# standard stand-in for it.
# Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
# Clipping", NeurIPS 2021, arXiv 1905.03871): the server also learns C toward the target_quantile of the update
# norms from the noised count of clipped clients, b = (sum_i 1[||delta_i|| <= C] + N(0, count_stddev^2)) / m,
# C <- C exp(-clip_lr (b - target_quantile)). The count is a second release, so the update's noise is split:
# sigma_update = (sigma^-2 - (2 count_stddev)^-2)^(-1/2) keeps the total at the accountant's sigma (their Thm 1).

@dataclass
class ClientDPSetup:
    max_update_norm: float                  # C: clip of a client's whole update (adaptive: its first value)
    target_quantile: Optional[float] = None  # adaptive clipping's target share of unclipped clients; None: fixed
    clip_lr: float = 0.2                    # adaptive clipping's geometric learning rate (Andrew et al.: 0.2)
    count_stddev: Optional[float] = None    # noise std of the clipped count; None: clients per round / 20


def update_noise_multiplier(noise_multiplier, count_stddev):
    """The update's share sigma_update of the total noise multiplier when the clipped count is released too
    (count_stddev None: fixed clipping, nothing is split)."""
    if count_stddev is None or noise_multiplier == 0:
        return noise_multiplier
    if noise_multiplier >= 2 * count_stddev:
        raise ValueError(f"adaptive clipping needs noise multiplier {noise_multiplier:.3g} < 2 x dp.clipped_count_stddev "
                         f"({count_stddev:.3g}): raise dp.clipped_count_stddev (e.g. {noise_multiplier:.2g}), raise "
                         f"epsilon, or use fixed clipping (dp.target_quantile=null)")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def clip_updates(global_state, client_states, max_update_norm):
    """Clip every client's update of the shared tensors, jointly over them, to its federation's norm C.

    global_state {name: [F, *shape]}; client_states {name: [F, m, *shape]}; max_update_norm [F].
    Returns (client states moved to x + clipped delta, update norms before clipping [F, m])."""
    deltas = {n: y - global_state[n][:, None] for n, y in client_states.items()}
    # one federation at a time: a reduction's summation order depends on the whole tensor's shape, and a
    # federation's norms must not depend on how many federations share the pass (measured: 1 ulp apart)
    norms = torch.stack([torch.stack([d[f].flatten(1).pow(2).sum(-1) for d in deltas.values()]).sum(0)
                         for f in range(len(max_update_norm))]).sqrt()
    factor = (max_update_norm[:, None] / (norms + 1e-6)).clamp(max=1.0)
    clipped = {n: global_state[n][:, None] + factor.view(*factor.shape, *([1] * (d.dim() - 2))) * d
               for n, d in deltas.items()}
    return clipped, norms


def add_update_noise(aggregated, names, std, noise_keys):
    """aggregated with N(0, std_f^2) added to every coordinate of federation f's tensors in `names`.

    std [F]: sigma_update C / m; noise_keys: F tuples. Federation f's noise is one standard-normal vector over
    the tensors in canonical order, torch.randn(D, generator=torch_generator(*noise_keys[f])), drawn on the CPU
    so every device draws the same."""
    out = dict(aggregated)
    sizes = [aggregated[n][0].numel() for n in names]
    noise = torch.stack([torch.randn(sum(sizes), generator=torch_generator(*k)) for k in noise_keys])
    noise = noise.to(std) * std[:, None]
    for n, part in zip(names, noise.split(sizes, dim=1)):
        out[n] = aggregated[n] + part.view_as(aggregated[n]).to(aggregated[n])
    return out


def adapt_clip(max_update_norm, norms, setup, noise_keys):
    """Andrew et al.'s geometric update of each federation's clip C [F] from the round's update norms [F, m]."""
    m = norms.shape[1]
    unclipped = (norms <= max_update_norm[:, None]).to(norms.dtype).sum(1)
    z = torch.stack([torch.randn((), generator=torch_generator(*k)) for k in noise_keys]).to(norms)
    share = (unclipped + setup.count_stddev * z) / m
    return max_update_norm * torch.exp(-setup.clip_lr * (share - setup.target_quantile))
