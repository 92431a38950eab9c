"""Local-step throughput of the batched engine vs the sequential peft reference, same work, one run.

    python -m bench.engine_throughput [--replicas 1 4 16 32] [--layers 6] [--batch 8] [--seq 64] [--steps 2]

Both train R clients for K local steps of b samples x T tokens (synthetic token ids, no padding, so
neither side can skip work) from the same initial adapter; time is wall-clock per round (the reference's
one-off model construction excluded) and the ratio is engine samples/s over reference samples/s. The engine picks its replica chunk itself (fedsim.autochunk).
Writes results/bench/engine_throughput.{json,png}. Defaults: CPU sizes of issue 3; on CUDA
R in {1, 10, 100, 1000}, b=16, T=128 (the reference is timed up to R=100 and extrapolated linearly
beyond, marked as such, since it is a plain loop whose time per client is constant).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedsim.autochunk import choose_replica_chunk
from fedsim.engine import Federation, FederatedEngine
from fedsim.models import load_backbone
from fedsim.reference import ReferenceConfig, build_model, run_reference
from fedsim.run import environment
from fedsim.stacked import StackedModel
from methods import make_method

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"
REPEATS = 2


def synthetic(n, T, vocab=30522, labels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab, (n, T), generator=g),
            "attention_mask": torch.ones(n, T, dtype=torch.long),
            "token_type_ids": torch.zeros(n, T, dtype=torch.long),
            "labels": torch.randint(0, labels, (n,), generator=g)}


def model_factory(layers, device):
    """(make_model, tokenizer): fresh MiniLM classifiers, identical across calls (load_backbone seeds the head)."""
    _, tok = load_backbone("all-MiniLM-L6-v2", num_labels=2, num_hidden_layers=layers)
    return lambda: load_backbone("all-MiniLM-L6-v2", num_labels=2, num_hidden_layers=layers)[0].to(device).eval(), tok


def time_engine(make_model, data, parts, R, K, b, rank, device, chunk=None):
    method = make_method({"name": "fedavg_lora"}, {"rank": rank, "alpha": 2 * rank, "targets": ["query", "value"]})
    feds = [Federation(seed=0, lr=1e-3, lora_alpha=2 * rank, partitions=parts)]
    stacked = StackedModel(make_model(), R, rank).to(device)
    eng = FederatedEngine(stacked, method, data, feds, local_steps=K, batch_size=b, client_fraction=1.0,
                          optimizer={"name": "adamw", "lr": 1e-3}, replica_chunk=chunk, device=device)
    if chunk is None:
        choose_replica_chunk(eng, data["input_ids"].shape[1])
    eng.run_round()                                   # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dt = float("inf")
    for _ in range(REPEATS):                          # best of REPEATS: robust to a busy machine
        t0 = time.perf_counter()
        eng.run_round()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = min(dt, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    init = {k: v[0].cpu() for k, v in eng.global_state.items()}
    return dt, eng.chunk, peak, init


def time_reference(make_model, data, parts, init, K, b, rank):
    """Seconds the reference spends training (its one-off model construction, timed separately, excluded)."""
    cfg = ReferenceConfig(rounds=1, local_steps=K, batch_size=b, lr=1e-3, optimizer="adamw", lora_r=rank,
                          lora_alpha=2 * rank)
    run_reference(make_model, data, parts[:1], init, cfg)      # warm-up
    t0 = time.perf_counter()
    build_model(make_model, cfg)
    t_build = time.perf_counter() - t0
    dt = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        run_reference(make_model, data, parts, init, cfg)
        dt = min(dt, time.perf_counter() - t0)
    return dt - t_build


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 10, 100, 1000] if cuda else [1, 4, 16, 32])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16 if cuda else 8)
    ap.add_argument("--seq", type=int, default=128 if cuda else 64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reference-max", type=int, default=100, help="largest R the reference loop is timed at")
    ap.add_argument("--out", default=str(OUT / "engine_throughput"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    make_model, _ = model_factory(args.layers, device)

    rows, ref_per_client = [], None
    for R in args.replicas:
        n = max(args.batch * 4, 32)
        data = synthetic(R * n, args.seq)
        parts = [np.arange(i * n, (i + 1) * n) for i in range(R)]
        t_eng, chunk, peak, init = time_engine(make_model, data, parts, R, args.steps, args.batch, args.rank, device)
        measured = R <= args.reference_max
        if measured:
            t_ref = time_reference(make_model, data, parts, init, args.steps, args.batch, args.rank)
            ref_per_client = t_ref / R
        else:
            t_ref = ref_per_client * R
        samples = R * args.steps * args.batch
        row = dict(replicas=R, chunk=chunk, engine_s=round(t_eng, 3), reference_s=round(t_ref, 3),
                   reference_measured=measured, engine_samples_per_s=round(samples / t_eng, 1),
                   reference_samples_per_s=round(samples / t_ref, 1), speedup=round(t_ref / t_eng, 3),
                   engine_peak_mib=peak)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = dict(model="all-MiniLM-L6-v2", layers=args.layers, batch=args.batch, seq=args.seq, steps=args.steps,
                 rank=args.rank, targets=["query", "value"], optimizer="adamw")
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows, "env": environment(device)}, indent=2))
    plot(rows, setup, device, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and .png")


def plot(rows, setup, device, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    R = [r["replicas"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(R, [r["engine_samples_per_s"] for r in rows], "o-", label="fedsim engine (one batched pass)")
    ax.plot(R, [r["reference_samples_per_s"] for r in rows], "s--", label="sequential peft loop")
    for r in rows:
        ax.annotate(f"{r['speedup']:.2f}x", (r["replicas"], r["engine_samples_per_s"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("clients trained per round (R)")
    ax.set_ylabel("local-step throughput (samples/s)")
    ax.set_title(f"MiniLM-{setup['layers']}L, b={setup['batch']}, T={setup['seq']}, LoRA r={setup['rank']} ({device.type})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
