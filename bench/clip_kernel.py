"""Micro-benchmark of DP clip + sum + noise over stacked replicas: fused Triton kernel vs the torch path.

Shape: R replicas x b samples x D = trainable size of MiniLM-L6 with LoRA r=8 on query/value + a 3-label
head. The kernel is memory bound, so the figure of merit is effective bandwidth = bytes of grads / time.
The torch path draws its noise on the CPU (device-independent streams), so it is timed with sigma=0
(clip + sum only) and, separately, with noise.

    python -m bench.clip_kernel            # writes results/bench/clip_kernel.json
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fedsim.dp import clip_and_noise

LAYERS, HIDDEN, RANK, LABELS = 6, 384, 8, 3
D = LAYERS * 2 * (RANK * HIDDEN + HIDDEN * RANK) + LABELS * HIDDEN + LABELS  # 74,883


def timeit(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--R", type=int, default=None, help="replicas (default 1000 on CUDA, 32 on CPU)")
    ap.add_argument("--b", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="results/bench/clip_kernel.json")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    R = args.R or (1000 if cuda else 32)
    if not cuda:
        print("the Triton kernel needs CUDA: timing only the torch path on CPU, at R =", R)

    g = torch.Generator(device=device).manual_seed(0)
    grads = torch.randn(R, args.b, D, device=device, generator=g)
    sq = grads.square().sum(-1)
    keys = [(0, "bench", r) for r in range(R)]
    gbytes = grads.numel() * grads.element_size() / 1e9
    C, sigma, B = 1.0, 0.8, float(args.b)

    cases = {
        "torch_sigma0": lambda: clip_and_noise(grads, C, 0.0, B, keys, sq_norms=sq, backend="torch"),
        "torch_with_noise": lambda: clip_and_noise(grads, C, sigma, B, keys, sq_norms=sq, backend="torch"),
    }
    if cuda:
        cases["triton_sq_norms_given"] = lambda: clip_and_noise(grads, C, sigma, B, keys, sq_norms=sq,
                                                                backend="triton")
        cases["triton_norms_in_kernel"] = lambda: clip_and_noise(grads, C, sigma, B, keys, backend="triton")
    res = {}
    for name, fn in cases.items():
        iters = 1 if name == "torch_with_noise" else args.iters  # CPU noise draws: slow, and stable
        t = timeit(fn, iters, warmup=1 if iters == 1 else 2)
        res[name] = {"seconds": t, "effective_GBps": gbytes / t}
        print(f"{name:24s} {t * 1e3:9.2f} ms  {gbytes / t:8.1f} GB/s")
    if cuda:
        err = (cases["torch_sigma0"]() - clip_and_noise(grads, C, 0.0, B, keys, sq_norms=sq, backend="triton"))
        res["max_abs_err_sigma0"] = err.abs().max().item()
        for ref in ("torch_sigma0", "torch_with_noise"):
            res[f"speedup_triton_vs_{ref}"] = res[ref]["seconds"] / res["triton_sq_norms_given"]["seconds"]
            print(f"speedup (triton, sq_norms given) vs {ref}: {res[f'speedup_triton_vs_{ref}']:.1f}x")

    info = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "cuda": cuda, "torch": torch.__version__, "R": R, "b": args.b, "D": D,
            "grads_GB": gbytes, "iters": args.iters}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": info, "results": res}, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
