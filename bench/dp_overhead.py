"""What DP costs in the engine, and the engine's DP run vs an Opacus + peft per-client loop.

    python -m bench.dp_overhead [--task sst2] [--clients 16] [--layers 6] [--batch 16] [--steps 2] [--accuracy]

1. DP round vs non-DP round of the engine, same physical shapes (R clients x b rows x T tokens): the
   private one computes per-sample gradients of every trainable tensor, clips, noises (ratio, target <= 1.1x).
2. The engine's private round vs Opacus 1.6 (hooks and ghost clipping) training the same clients one after
   another with peft, same K, q, sigma, C, each batch cut to its longest row (ratio; targets: >= 2x on a CPU
   at 16 clients, >= 5x on a GPU at 100).
Rows: real SST-2 training rows by default (--task), so the engine's packed tokens meet real lengths.
3. --accuracy: a short private SST-2 run (3 clients, eps=3) with the engine and with the Opacus loop over
   the same seeds: mean +- std validation accuracy of both (equal within seed noise is the claim).
Writes results/bench/dp_overhead.json.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.engine_throughput import TASK_LENGTHS, model_factory, task_rows
from bench.opacus_loop import run_opacus_clients
from fedsim.autochunk import choose_replica_chunk
from fedsim.dp import max_poisson_batch, noise_multiplier_for
from fedsim.engine import DPSetup, Federation, build_engine
from fedsim.reference import ReferenceConfig, build_model
from fedsim.provenance import environment
from methods import make_method

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"


def engine_for(make_model, data, parts, seeds, K, b, rank, device, dp=None, sigma=0.0, lr=0.5, chunk=None):
    method = make_method({"name": "fedavg_lora"}, {"rank": rank, "alpha": 2 * rank, "targets": ["query", "value"]})
    feds = [Federation(seed=s, lr=lr, lora_alpha=2 * rank, noise_multiplier=sigma, partitions=p)
            for s, p in zip(seeds, parts)]
    eng = build_engine(method, make_model(), data, feds, local_steps=K, batch_size=b, client_fraction=1.0,
                       optimizer={"name": "sgd", "lr": lr}, dp=dp, replica_chunk=chunk, device=device)
    if chunk is None and device.type == "cpu":
        choose_replica_chunk(eng, data["input_ids"].shape[1])
    return eng


def timed_round(eng, repeats=2):
    eng.run_round()                                   # warm-up
    times = []
    for _ in range(repeats):
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.run_round()
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100 if cuda else 16)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="expected batch (Poisson) = physical non-DP batch")
    ap.add_argument("--task", default="sst2", choices=["sst2", "mnli", "synthetic"],
                    help="rows: real training rows of a GLUE task (their lengths), or synthetic full-length ones")
    ap.add_argument("--seq", type=int, default=64, help="tokens per row of the synthetic task")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--out", default=str(OUT / "dp_overhead.json"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    _, tok = model_factory(args.layers, device)

    R, b, K = args.clients, args.batch, args.steps
    n = 8 * b                                          # client size; q = b / n
    data = task_rows(args.task, R * n, tok, args.seq)
    make_model, _ = model_factory(args.layers, device, num_labels=int(data["labels"].max()) + 1)
    parts = [np.arange(i * n, (i + 1) * n) for i in range(R)]
    q, sigma, C = b / n, 1.0, 1.0
    # 1. same physical shapes: clients of exactly b samples and q = 1, so every private step holds the same
    #    b rows as a non-private step (no padding slots, nothing trimmed); only per-sample grads + clip + noise differ.
    whole = [p[:b] for p in parts]
    #    Same replica chunk too (the non-private run's measured choice), so only the DP work differs.
    plain = engine_for(make_model, data, [whole], [0], K, b, args.rank, device)
    t_plain = timed_round(plain)
    dp_same = DPSetup(max_grad_norm=C, sample_rate=1.0, max_batch=b)
    t_dp_same = timed_round(engine_for(make_model, data, [whole], [0], K, b, args.rank, device, dp=dp_same, sigma=sigma,
                                       chunk=plain.chunk))
    # 2. engine DP round vs the Opacus loop doing the same DP work (same q, K, sigma, C, clients)
    dp = DPSetup(max_grad_norm=C, sample_rate=q, max_batch=max_poisson_batch(b, 5.0))
    eng = engine_for(make_model, data, [parts], [0], K, b, args.rank, device, dp=dp, sigma=sigma)
    t_dp = timed_round(eng)
    init = {k: v[0].cpu() for k, v in eng.global_state.items()}
    ref_cfg = ReferenceConfig(rounds=1, local_steps=K, batch_size=b, lr=0.5, lora_r=args.rank, lora_alpha=2 * args.rank,
                              dp_max_grad_norm=C, dp_noise_multiplier=sigma, dp_sample_rate=q)
    opacus = {}
    t0 = time.perf_counter()
    build_model(make_model, ref_cfg)                   # the loop's one-off construction, excluded below
    t_build = time.perf_counter() - t0
    for mode in ("hooks", "ghost"):
        run_opacus_clients(make_model, data, parts[:1], init, ref_cfg, grad_sample_mode=mode)   # warm-up
        t0 = time.perf_counter()
        run_opacus_clients(make_model, data, parts, init, ref_cfg, grad_sample_mode=mode)
        opacus[mode] = time.perf_counter() - t0 - t_build
    samples = R * K * b
    result = dict(
        setup=dict(clients=R, layers=args.layers, expected_batch=b, task=args.task,
                   max_length=TASK_LENGTHS.get(args.task, args.seq), local_steps=K, rank=args.rank,
                   sample_rate=q, noise_multiplier=sigma, max_grad_norm=C, engine_chunk=eng.chunk),
        dp_vs_nondp_same_shapes=dict(nondp_round_s=round(t_plain, 3), dp_round_s=round(t_dp_same, 3),
                                     ratio=round(t_dp_same / t_plain, 3), chunk=plain.chunk),
        engine_vs_opacus=dict(engine_dp_round_s=round(t_dp, 3), engine_samples_per_s=round(samples / t_dp, 1),
                              **{f"opacus_{m}_s": round(v, 3) for m, v in opacus.items()},
                              **{f"speedup_vs_opacus_{m}": round(v / t_dp, 3) for m, v in opacus.items()}))
    print(json.dumps(result, indent=2), flush=True)
    if args.accuracy:
        result["accuracy"] = accuracy_check(model_factory(args.layers, device)[0], tok, device)   # SST-2: 2 labels
        print(json.dumps(result["accuracy"], indent=2))
    result["env"] = environment(device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


@torch.no_grad()
def _accuracy(model, evalset):
    logits = torch.cat([model(**{k: v[i:i + 128] for k, v in evalset.items() if k != "labels"}).logits
                        for i in range(0, len(evalset["labels"]), 128)])
    return (logits.argmax(-1) == evalset["labels"]).float().mean().item()


def accuracy_check(make_model, tok, device, seeds=(0, 1, 2), rounds=8, K=5, b=16, eps=3.0):
    """Private SST-2, 3 clients, Dirichlet 0.5: engine (all seeds in one pass) vs the Opacus loop per seed."""
    from fedsim.tasks import load_tokenized
    from partitions import dirichlet_label_skew
    train = load_tokenized("sst2", "train", tok, max_length=64, padding="max_length", subsample=6000, seed=0)
    evalset = load_tokenized("sst2", "validation", tok, max_length=64, padding="max_length")
    parts = [dirichlet_label_skew(train["labels"].numpy(), 3, alpha=0.5, seed=s) for s in seeds]
    q = b / np.mean([len(p) for p in parts[0]])
    sigma = noise_multiplier_for(eps, 1e-5, q, rounds * K)
    dp = DPSetup(max_grad_norm=1.0, sample_rate=q, max_batch=max_poisson_batch(q * max(len(p) for pp in parts for p in pp), 5.0))
    eng = engine_for(make_model, train, parts, list(seeds), K, b, 8, device, dp=dp, sigma=sigma, lr=0.5)
    eng.eval_sets, eng.eval_batch_size = {"validation": evalset}, 128
    init = {k: v.clone().cpu() for k, v in eng.global_state.items()}
    for _ in range(rounds):
        eng.run_round()
    fedsim_acc = eng.evaluate()["validation"]
    opacus_acc = []
    for i, s in enumerate(seeds):
        cfg = ReferenceConfig(rounds=rounds, local_steps=K, batch_size=b, lr=0.5, seed=s,
                              dp_max_grad_norm=1.0, dp_noise_multiplier=sigma, dp_sample_rate=q)
        glob, _ = run_opacus_clients(make_model, train, parts[i], {k: v[i] for k, v in init.items()}, cfg)
        model, params, _ = build_model(make_model, cfg)
        for k, v in glob.items():
            params[k].data.copy_(v)
        opacus_acc.append(_accuracy(model.eval(), evalset))
    return dict(task="sst2 (6,000-row train subset, full validation)", clients=3, rounds=rounds, local_steps=K,
                epsilon=eps, noise_multiplier=sigma, seeds=list(seeds),
                fedsim=dict(per_seed=fedsim_acc, mean=float(np.mean(fedsim_acc)), std=float(np.std(fedsim_acc))),
                opacus_hooks=dict(per_seed=opacus_acc, mean=float(np.mean(opacus_acc)), std=float(np.std(opacus_acc))))


if __name__ == "__main__":
    main()
