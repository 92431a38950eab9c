"""Fused Triton kernels for DP-SGD's clip + sum + noise over stacked replicas (backend="triton" of
fedsim.dp.clip_and_noise). Imported lazily by fedsim.dp, so CPU-only code never needs triton.

Memory traffic is the cost: grads [R, b, D] is read once by the clip kernel (grid over (replica, D-block),
loop over samples, accumulate in registers), plus once more by the norm kernel when the caller did not
pass per-sample squared norms. Noise is Philox (tl.randn) seeded per replica, offset by coordinate, so
it never touches memory.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sq_norm_kernel(g_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    # one program per (replica, sample) row: sum of squares over D
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        g = tl.load(g_ptr + row * D + offs, mask=offs < D, other=0.0)
        acc += g * g
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _clip_noise_kernel(g_ptr, sq_ptr, c_ptr, sigma_ptr, bsz_ptr, seed_ptr, out_ptr, b, D,
                       BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    C = tl.load(c_ptr + r)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n in range(0, b):
        row = r * b + n
        factor = tl.minimum(C / (tl.sqrt(tl.load(sq_ptr + row)) + 1e-6), 1.0)
        acc += factor * tl.load(g_ptr + row * D + offs, mask=mask, other=0.0)
    sigma = tl.load(sigma_ptr + r)
    if sigma > 0:
        # Philox(seed_r, counter = coordinate): blocks of one replica use disjoint counters
        acc += (sigma * C) * tl.randn(tl.load(seed_ptr + r), offs)
    tl.store(out_ptr + r * D + offs, acc / tl.load(bsz_ptr + r), mask=mask)


def per_sample_sq_norms(grads: torch.Tensor, block_d: int = 1024) -> torch.Tensor:
    R, b, D = grads.shape
    out = torch.empty(R * b, dtype=torch.float32, device=grads.device)
    _sq_norm_kernel[(R * b,)](grads, out, D, BLOCK_D=min(block_d, triton.next_power_of_2(D)))
    return out.view(R, b)


def fused_clip_and_noise(grads, max_grad_norm, noise_multiplier, expected_batch_size, seeds,
                         sq_norms=None, block_d: int = 1024) -> torch.Tensor:
    """grads float32 [R, b, D]; C / sigma / B float32 [R]; seeds int64 [R] -> [R, D]. Same math as dp.py."""
    grads = grads.contiguous()
    R, b, D = grads.shape
    if sq_norms is None:
        sq_norms = per_sample_sq_norms(grads, block_d)
    out = torch.empty(R, D, dtype=torch.float32, device=grads.device)
    block_d = min(block_d, triton.next_power_of_2(D))
    _clip_noise_kernel[(R, triton.cdiv(D, block_d))](
        grads, sq_norms.contiguous().float(), max_grad_norm, noise_multiplier, expected_batch_size, seeds, out,
        b, D, BLOCK_D=block_d)
    return out
