"""Local-step throughput of the batched engine vs the sequential peft reference, same work, one run.

    python -m bench.engine_throughput [--tasks sst2 mnli] [--replicas 1 4 16 32] [--layers 6] [--batch 8]

Per task and client count R, three ways train R clients for K local steps of b samples from the same
initial adapter, timed side by side (best of REPEATS rounds, after a warm-up round):
- packed: the engine with the backbone on real tokens only (fedsim.packed);
- padded: the engine with the padded forward, rows grouped by length (what it did before packing);
- reference: the sequential peft loop, one client after another, each batch cut to its longest row
  (per-batch dynamic padding, as a user's collator does).
Tasks: real SST-2 (max_length 64) and MNLI (128) training rows, or `synthetic` (every row T tokens, no
padding: --seq). Full fine-tuning (FedAvg-FFT, --fft-replicas) is timed the same three ways: packed
tokens through per-replica weights (fedsim.full_stacked's replica modules), the vmap pass over padded
rows, and the sequential full fine-tuning loop; its rounds also step AdamW over every weight of every replica. Both engines use the replica chunk autochunk picks for the packed one. Each row also
gives the reference's real-token share: the packed engine's headroom over it is 1 / that share if both
ran their GEMMs equally fast (on a CPU both already run at the GEMM peak, so that is the ceiling there).

Also measured in the same run: the machine's dense-GEMM peak at the backbone's shapes (fp32 on a CPU,
bf16 on CUDA) and the packed engine's model FLOPs utilisation: useful FLOPs (real tokens only: the frozen
linears' forward and input-gradient backward, attention over each sequence's own tokens, LoRA's work)
per second over that peak. Writes results/bench/engine_throughput.{json,png}. On CUDA the defaults grow
to R in {1, 10, 100, 1000}, b=16 (the reference is timed up to R=100 and extrapolated linearly beyond,
marked as such, since it is a plain loop whose time per client is constant).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedsim.autochunk import choose_replica_chunk
from fedsim.engine import Federation, build_engine
from fedsim.models import load_backbone
from fedsim.reference import ReferenceConfig, build_model, run_reference
from fedsim.provenance import environment
from fedsim.sampling import fixed_batches
from fedsim.tasks import load_tokenized
from methods import make_method

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"
REPEATS = 2


def synthetic(n, T, vocab=30522, labels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab, (n, T), generator=g),
            "attention_mask": torch.ones(n, T, dtype=torch.long),
            "token_type_ids": torch.zeros(n, T, dtype=torch.long),
            "labels": torch.randint(0, labels, (n,), generator=g)}


def model_factory(layers, device, num_labels=2):
    """(make_model, tokenizer): fresh MiniLM classifiers, identical across calls (load_backbone seeds the head)."""
    _, tok = load_backbone("all-MiniLM-L6-v2", num_labels=num_labels, num_hidden_layers=layers)
    return lambda: load_backbone("all-MiniLM-L6-v2", num_labels=num_labels,
                                 num_hidden_layers=layers)[0].to(device).eval(), tok


TASK_LENGTHS = {"sst2": 64, "mnli": 128}       # max_length of the tasks' quick/paper profiles


def task_rows(task, n, tokenizer, seq):
    """n training rows: real ones of a GLUE task (padding to the longest), or synthetic full-length rows."""
    if task == "synthetic":
        return synthetic(n, seq)
    data = load_tokenized(task, "train", tokenizer, max_length=TASK_LENGTHS[task], padding="longest",
                          subsample=n, seed=0)
    return {k: v for k, v in data.items()}


def build(make_model, data, parts, R, K, b, rank, device, packed, chunk, method="fedavg_lora"):
    method = make_method({"name": method}, {"rank": rank, "alpha": 2 * rank, "targets": ["query", "value"]})
    feds = [Federation(seed=0, lr=1e-3, lora_alpha=2 * rank, partitions=parts)]
    eng = build_engine(method, make_model(), data, feds, local_steps=K, batch_size=b, client_fraction=1.0,
                       optimizer={"name": "adamw", "lr": 1e-3}, replica_chunk=chunk, device=device, packed_tokens=packed)
    if chunk is None:
        choose_replica_chunk(eng, data["input_ids"].shape[1])
    return eng


def time_engine(eng, device):
    """(seconds of the fastest of REPEATS rounds, real tokens that round trained, its per-sequence lengths)."""
    eng.run_round()                                   # warm-up (allocator, kernels)
    lengths = eng.train["attention_mask"].sum(1)
    best = (float("inf"), 0, None)
    for _ in range(REPEATS):
        rows = eng.plan_round(eng.round_idx).rows
        seq = lengths[rows.reshape(-1)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.run_round()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt < best[0]:
            best = (dt, int(seq.sum()), seq)
    return best


def time_reference(make_model, data, parts, init, K, b, rank, full_finetune=False):
    """Seconds the reference spends training (its one-off model construction, timed separately, excluded)."""
    cfg = ReferenceConfig(rounds=1, local_steps=K, batch_size=b, lr=1e-3, optimizer="adamw", lora_r=rank,
                          lora_alpha=2 * rank, full_finetune=full_finetune)
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


def gemm_peak(config, device, dtype, rows=4096, repeats=20):
    """Best dense-GEMM FLOP/s of this device at the backbone's shapes: [rows, H] x [H, I] and [rows, I] x [I, H]."""
    H, inter = config.hidden_size, config.intermediate_size
    x, w1, w2 = (torch.randn(*s, device=device, dtype=dtype) for s in ((rows, H), (H, inter), (inter, H)))
    (x @ w1) @ w2                                    # warm-up
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (x @ w1) @ w2
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * 2 * rows * H * inter / (time.perf_counter() - t0))
    return best


def useful_flops(config, layers, lengths, rank, adapted_per_layer=2):
    """FLOPs a round needs on real tokens only (lengths: each trained sequence's real tokens).
    Per token and layer: frozen linears 2 P forward + 2 P input-gradient backward (P = 4 H^2 + 2 H I weights;
    no weight gradients: they are frozen); LoRA on `adapted_per_layer` H x H linears, about 3 x 2 r (H + H)
    (forward, backward, its own gradients). Attention per sequence of n tokens: 4 n^2 H forward, 8 n^2 H backward."""
    H, inter = config.hidden_size, config.intermediate_size
    P = 4 * H * H + 2 * H * inter
    n = lengths.double()
    per_token = 4 * P + adapted_per_layer * 3 * 2 * rank * 2 * H
    return float(layers * (per_token * n.sum() + 12 * H * (n ** 2).sum()))


def reference_token_fraction(data, parts, K, b, seed=0, t=0):
    """Real tokens / token slots the reference computes in round t: each batch padded to its longest row."""
    lengths = data["attention_mask"].sum(1)
    real = slots = 0
    for c, part in enumerate(parts):
        for pos in fixed_batches(len(part), b, K, seed, t, c):
            n = lengths[torch.as_tensor(part[pos])]
            real, slots = real + int(n.sum()), slots + int(n.max()) * len(n)
    return real / slots


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mnli"], choices=["sst2", "mnli", "synthetic"])
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 10, 100, 1000] if cuda else [1, 4, 16, 32])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16 if cuda else 8)
    ap.add_argument("--seq", type=int, default=128 if cuda else 64, help="tokens per row of the synthetic task")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reference-max", type=int, default=100, help="largest R the reference loop is timed at")
    ap.add_argument("--fft-replicas", type=int, nargs="*", default=[1, 3, 9],
                    help="client counts of the full fine-tuning rows (none: skip them)")
    ap.add_argument("--out", default=str(OUT / "engine_throughput"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    _, tokenizer = model_factory(args.layers, device)
    config = load_backbone("all-MiniLM-L6-v2", num_hidden_layers=args.layers)[0].config
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak = gemm_peak(config, device, peak_dtype)
    print(json.dumps({"gemm_peak_gflops": round(peak / 1e9, 1), "dtype": str(peak_dtype)}), flush=True)

    rows = []
    for task in args.tasks:
        ref_per_client = None
        for R in args.replicas:
            n = max(args.batch * 4, 32)
            data = task_rows(task, R * n, tokenizer, args.seq)
            make_model, _ = model_factory(args.layers, device, num_labels=int(data["labels"].max()) + 1)
            parts = [np.arange(i * n, (i + 1) * n) for i in range(R)]
            packed = build(make_model, data, parts, R, args.steps, args.batch, args.rank, device, True, None)
            t_packed, tokens, lengths = time_engine(packed, device)
            padded = build(make_model, data, parts, R, args.steps, args.batch, args.rank, device, False, packed.chunk)
            t_padded, _, _ = time_engine(padded, device)
            measured = R <= args.reference_max
            if measured:
                init = {k: v[0].cpu() for k, v in packed.global_state.items()}
                t_ref = time_reference(make_model, data, parts, init, args.steps, args.batch, args.rank)
                ref_per_client = t_ref / R
            else:
                t_ref = ref_per_client * R
            samples = R * args.steps * args.batch
            flops = useful_flops(config, args.layers, lengths, args.rank)
            row = dict(task=task, method="fedavg_lora", replicas=R, chunk=packed.chunk, packed_s=round(t_packed, 3),
                       padded_s=round(t_padded, 3), reference_s=round(t_ref, 3), reference_measured=measured,
                       real_token_fraction_of_max_length=round(tokens / (samples * data["input_ids"].shape[1]), 3),
                       packed_samples_per_s=round(samples / t_packed, 1),
                       packed_real_tokens_per_s=round(tokens / t_packed, 1),
                       reference_samples_per_s=round(samples / t_ref, 1),
                       reference_real_token_fraction=round(reference_token_fraction(data, parts, args.steps,
                                                                                    args.batch), 3),
                       speedup=round(t_ref / t_packed, 3), packed_vs_padded=round(t_padded / t_packed, 3),
                       mfu=round(flops / t_packed / peak, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for task in args.tasks:
        for R in args.fft_replicas:
            rows.append(fft_row(task, R, args, tokenizer, device))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = dict(model="all-MiniLM-L6-v2", layers=args.layers, batch=args.batch, steps=args.steps, rank=args.rank,
                 targets=["query", "value"], optimizer="adamw", tasks=args.tasks,
                 max_length={t: TASK_LENGTHS.get(t, args.seq) for t in args.tasks},
                 gemm_peak_gflops=round(peak / 1e9, 1), gemm_peak_dtype=str(peak_dtype))
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows, "env": environment(device)}, indent=2))
    plot(rows, setup, device, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and .png")


def fft_row(task, R, args, tokenizer, device):
    """FedAvg-FFT: packed replica modules vs the vmap pass vs the sequential full fine-tuning loop."""
    n = max(args.batch * 4, 32)
    data = task_rows(task, R * n, tokenizer, args.seq)
    make_model, _ = model_factory(args.layers, device, num_labels=int(data["labels"].max()) + 1)
    parts = [np.arange(i * n, (i + 1) * n) for i in range(R)]
    times, chunk = {}, None
    for packed in (True, False):                    # the chunk autochunk picks for the packed pass, for both
        eng = build(make_model, data, parts, R, args.steps, args.batch, args.rank, device, packed, chunk, "fedavg_fft")
        chunk = eng.chunk
        times[packed], tokens, _ = time_engine(eng, device)
    init = {k: v[0].cpu() for k, v in eng.global_state.items()}
    t_ref = time_reference(make_model, data, parts, init, args.steps, args.batch, args.rank, full_finetune=True)
    return dict(task=task, method="fedavg_fft", replicas=R, chunk=chunk, packed_s=round(times[True], 3),
                padded_s=round(times[False], 3), reference_s=round(t_ref, 3), reference_measured=True,
                packed_real_tokens_per_s=round(tokens / times[True], 1), speedup=round(t_ref / times[True], 3),
                packed_vs_padded=round(times[False] / times[True], 3))


def plot(rows, setup, device, path):
    """One panel per task: samples/s of the packed engine, the padded engine and the reference vs R."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("method", "fedavg_lora") == "fedavg_lora"]      # the LoRA rows
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == task]
        R = [r["replicas"] for r in rs]
        samples = [r["replicas"] * setup["steps"] * setup["batch"] for r in rs]
        ax.plot(R, [r["packed_samples_per_s"] for r in rs], "o-", label="fedsim, packed tokens")
        ax.plot(R, [s / r["padded_s"] for s, r in zip(samples, rs)], "^:", label="fedsim, padded (length groups)")
        ax.plot(R, [r["reference_samples_per_s"] for r in rs], "s--", label="sequential peft loop (dynamic padding)")
        for r in rs:
            ax.annotate(f"{r['speedup']:.2f}x", (r["replicas"], r["packed_samples_per_s"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("clients trained per round (R)")
        ax.set_ylabel("local-step throughput (samples/s)")
        ax.set_title(f"{task}: MiniLM-{setup['layers']}L, b={setup['batch']}, max_length {setup['max_length'][task]}, "
                     f"LoRA r={setup['rank']} ({device.type})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
