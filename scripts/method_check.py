"""Short CPU runs of every method (and every server optimizer on FedAvg-LoRA) on MNLI (3 clients, Dirichlet
0.5) and 20 Newsgroups (10 clients, Dirichlet 0.1), without DP, with sample-level DP (eps=3) and, where clients
are sampled, client-level DP (eps=3): final accuracy and bytes uploaded per round.

    python -m scripts.method_check [--rounds 4] [--layers 4] [--out results/method_check]

A sanity table at small scale (4-layer MiniLM, subsampled data, few rounds), not a reproduction:
it shows every method runs through the same engine, private and not, and what each one sends.
"""
import argparse
import json
from pathlib import Path

import pandas as pd

from fedsim.config import DEFAULTS, load_config
from fedsim.run import run
from methods import make_method

# name: (method section, client learning rate, other config overrides)
METHODS = {
    "fedavg_fft": ({"name": "fedavg_fft"}, 1e-4, {}),
    "fedavg_lora": ({"name": "fedavg_lora"}, 2e-3, {}),
    "ffa_lora": ({"name": "ffa_lora"}, 2e-3, {}),
    "slora": ({"name": "slora", "stage1_rounds": 2, "density": 0.01}, 2e-3, {}),
    "sa_fedlora": ({"name": "sa_fedlora", "init_rounds": 1, "anneal_rounds": 2, "cooling_rank": 2}, 2e-3, {}),
    "fedsa_lora": ({"name": "fedsa_lora"}, 2e-3, {}),     # accuracy: the global model (A, head; B at zero)
    "local_lora": ({"name": "local_lora"}, 2e-3, {}),     # accuracy: the global model (never trained)
    "fedprox": ({"name": "fedprox", "mu": 0.01}, 2e-3, {}),
    "scaffold": ({"name": "scaffold"}, 2e-3, {}),
    "fedex_lora": ({"name": "fedex_lora"}, 2e-3, {}),
    "flora": ({"name": "flora"}, 2e-3, {}),
    "hetlora": ({"name": "hetlora", "rank_choices": [2, 4, 8]}, 2e-3, {}),
    "hetlora+pruning": ({"name": "hetlora", "rank_choices": [2, 4, 8], "prune_gamma": 0.5}, 2e-3, {}),
    "flora+ranks": ({"name": "flora", "rank_choices": [2, 4, 8]}, 2e-3, {}),
    "fedavg_lora+fedavgm": ({"name": "fedavg_lora"}, 2e-3, {"server": {"optimizer": "fedavgm", "lr": 0.3}}),
    "fedavg_lora+fedadam": ({"name": "fedavg_lora"}, 2e-3, {"server": {"optimizer": "fedadam", "lr": 0.01}}),
    "fedavg_lora+fedyogi": ({"name": "fedavg_lora"}, 2e-3, {"server": {"optimizer": "fedyogi", "lr": 0.01}}),
    "fedavg_lora+fedadagrad": ({"name": "fedavg_lora"}, 2e-3, {"server": {"optimizer": "fedadagrad", "lr": 0.01}}),
}
# privacy: (label, dp overrides); client-level DP runs only where clients are sampled (q < 1) and the method's
# uploads can be protected by it (fedsim.interface.Method.client_dp_unsupported)
PRIVACY = [("none", {}), ("sample eps=3", {"epsilon": 3.0, "unit": "sample"}),
           ("client eps=3", {"epsilon": 3.0, "unit": "client"})]
TASKS = {
    "mnli": dict(task="mnli", num_clients=3, client_fraction=1.0, partition={"name": "dirichlet", "alpha": 0.5},
                 max_length=64),
    "20news": dict(task="20news", num_clients=10, client_fraction=0.3, strip_metadata=True, max_length=96,
                   partition={"name": "dirichlet", "alpha": 0.1}),
}


def upload_by_round(run_dir):
    """Bytes all sampled clients upload per round, as 'MB x rounds' per stretch of equal payload
    (SLoRA's and SA-FedLoRA's payload changes with the stage and the rank)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ups = [r["up_bytes"] for r in recs if r["federation"] == 0]
    runs = []
    for u in ups:
        if runs and runs[-1][0] == u:
            runs[-1][1] += 1
        else:
            runs.append([u, 1])
    return " -> ".join(f"{u / 1e6:.3f} x{n}" for u, n in runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-rows", type=int, default=3000)
    ap.add_argument("--eval-rows", type=int, default=500)
    ap.add_argument("--out", default="results/method_check")
    args = ap.parse_args(argv)
    rows = []
    for task, tcfg in TASKS.items():
        for method, (mcfg, lr, extra) in METHODS.items():
            for privacy, dp in PRIVACY:
                if dp and method == "fedavg_fft":
                    continue   # per-sample grads of all 22M weights (11.7M embedding) per sample: GPU-only scale
                if dp.get("unit") == "client" and (tcfg["client_fraction"] == 1.0 or
                                                   make_method(mcfg, DEFAULTS["lora"]).client_dp_unsupported):
                    continue
                name = f"{task}_{method}_{privacy.replace(' ', '_').replace('=', '')}"
                cfg = load_config(overrides=dict(
                    tcfg, method=mcfg, num_hidden_layers=args.layers, train_subsample=args.train_rows,
                    eval_subsample=args.eval_rows, rounds=args.rounds, local_steps=args.steps, batch_size=16,
                    eval_every=args.rounds, seeds=[0], optimizer={"name": "adamw", "lr": lr}, dp=dp, **extra))
                s = run(cfg, Path(args.out) / name, progress=False)
                fed = s["federations"][0]
                rows.append(dict(task=task, method=method, dp=privacy, status=s["status"],
                                 accuracy=round(next(iter((fed["final"] or {}).values()), float("nan")), 4),
                                 upload_MB_per_round=upload_by_round(Path(args.out) / name),
                                 epsilon_spent=round(fed["epsilon_spent"], 3) if dp else None,
                                 wall_s=s["wall_s"]))
                print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    note = (f"Scale: MiniLM truncated to {args.layers} layers, {args.train_rows} train rows, {args.eval_rows} "
            f"eval rows, {args.rounds} rounds x {args.steps} local steps, batch 16 (expected batch under DP), "
            "seed 0. upload_MB_per_round: what all sampled clients upload in a round, as MB x the number of "
            "rounds at that payload. MNLI at this scale "
            "is expected near chance (33%); 20news chance is 5%. FedAvg-FFT runs non-private only here: its "
            "private run needs per-sample gradients of every weight (the 11.7M-entry embedding included), "
            "which the engine supports but which is impractical on 2 CPU cores.\n\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(note + table.to_markdown(index=False) + "\n")
    table.to_csv(Path(args.out) / "table.csv", index=False)
    print(note + table.to_markdown(index=False))


if __name__ == "__main__":
    main()
