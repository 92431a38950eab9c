"""Run one experiment from a config: data -> partitions -> model -> engine rounds -> results on disk.

    python -m fedsim.run --config configs/quick_sst2.yaml --set dp.epsilon=3 --out results/x/run1

The run directory gets config.yaml (resolved), metrics.jsonl (one line per round and federation),
summary.json, env.json (git commit, device, library versions) and, while running, checkpoint.pt so a
killed run resumes where it stopped and ends with the same numbers. A finished run (summary.json
present) is skipped. Bad input fails before any compute and never touches an existing run directory.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from fedsim.config import federations, load_config, parse_set
from fedsim.autochunk import choose_replica_chunk
from fedsim.engine import DPSetup, Federation, FederatedEngine

REPO = Path(__file__).resolve().parent.parent


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def environment(device):
    import importlib.metadata as md
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    libs = {}
    for pkg in ("torch", "transformers", "datasets", "peft", "opacus", "triton", "numpy", "pandas"):
        try:
            libs[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"git_commit": commit, "git_dirty": dirty, "device": str(device), "device_name": dev,
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "libraries": libs}


class Experiment:
    """Everything built from a config, validated before compute."""

    def __init__(self, cfg):
        from fedsim.dp import max_poisson_batch, noise_multiplier_for
        from fedsim.tasks import get_task, load_split
        from methods import make_method
        from partitions import make_partition

        self.cfg = cfg
        self.task = get_task(cfg["task"])
        self.method = make_method(cfg["method"], cfg["lora"])          # unknown method/params: error now
        labels = load_split(self.task, self.task.train_split, data_dir=cfg["data_dir"],
                            subsample=cfg["train_subsample"], strip_metadata=cfg["strip_metadata"])["label"].to_numpy()
        pcfg = dict(cfg["partition"])
        pname = pcfg.pop("name")
        self.feds = []
        for seed, variant in federations(cfg):
            parts = make_partition(pname, labels, cfg["num_clients"], seed, **pcfg)
            self.feds.append(Federation(seed=seed, lr=variant.get("optimizer.lr", cfg["optimizer"]["lr"]),
                                        lora_alpha=variant.get("lora.alpha", cfg["lora"]["alpha"]),
                                        partitions=parts))
            self.feds[-1].variant = variant
        self.dp, self.epsilons = None, [None] * len(self.feds)
        dp = cfg["dp"]
        eps_list = [v.get("dp.epsilon", dp["epsilon"]) for _, v in federations(cfg)]
        if any(e is not None for e in eps_list):
            if any(e is None for e in eps_list):
                raise ValueError("dp.epsilon sweep mixes private and non-private federations; run them separately")
            # q = expected batch / mean client size. Partitions cover every row, so the mean client size is
            # rows / clients for every seed: q never depends on which federations share the pass.
            q = min(1.0, cfg["batch_size"] * cfg["num_clients"] / len(labels))
            sizes = [len(p) for f in self.feds for p in f.partitions]     # max_batch: padding only, exact
            self.steps_per_client = cfg["rounds"] * cfg["local_steps"]   # upper bound: every round sampled
            for f, eps in zip(self.feds, eps_list):
                f.noise_multiplier = noise_multiplier_for(eps, dp["delta"], q, self.steps_per_client, dp["accountant"])
            self.epsilons = eps_list
            self.dp = DPSetup(max_grad_norm=dp["max_grad_norm"], sample_rate=q,
                              max_batch=max_poisson_batch(q * max(sizes), dp["max_batch_factor"]))
        self.device = resolve_device(cfg["device"])

    def build(self):
        """The expensive part: model, tokenized tensors, stacked replicas, engine."""
        from fedsim.models import load_backbone
        from fedsim.tasks import load_tokenized
        cfg = self.cfg
        model, tok = load_backbone(cfg["model"], num_labels=self.task.num_labels,
                                   num_hidden_layers=cfg["num_hidden_layers"], seed=cfg["seeds"][0])
        m = max(1, min(cfg["num_clients"], round(cfg["client_fraction"] * cfg["num_clients"])))
        R = len(self.feds) * m
        stacked = self.method.build_stacked(model, R).to(self.device)    # the method picks its container
        kw = dict(max_length=cfg["max_length"], padding=cfg["padding"], data_dir=cfg["data_dir"],
                  strip_metadata=cfg["strip_metadata"])
        train = load_tokenized(self.task, self.task.train_split, tok, subsample=cfg["train_subsample"], **kw)
        evals = {name: load_tokenized(self.task, split, tok, subsample=cfg["eval_subsample"], **kw)
                 for name, split in self.task.eval_splits.items()}
        if self.device.type == "cuda":
            train = {k: v.pin_memory() for k, v in train.items()}
            evals = {s: {k: v.to(self.device) for k, v in d.items()} for s, d in evals.items()}
        engine = FederatedEngine(stacked, self.method, train, self.feds, local_steps=cfg["local_steps"],
                                 batch_size=cfg["batch_size"], client_fraction=cfg["client_fraction"],
                                 optimizer=cfg["optimizer"], dp=self.dp, replica_chunk=cfg["replica_chunk"],
                                 device=self.device, eval_sets=evals, eval_batch_size=cfg["eval_batch_size"])
        if cfg["replica_chunk"] is None and self.device.type == "cpu" and R > 1:
            choose_replica_chunk(engine, train["input_ids"].shape[1])
        return engine


def run(cfg, out_dir, progress=True):
    """Run (or resume, or skip if finished) one experiment into out_dir. Returns the summary dict."""
    out = Path(out_dir)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    exp = Experiment(cfg)                       # every check happens here, before anything is written
    engine = exp.build()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ckpt, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    records, wall = [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        engine.load_state_dict(state["engine"])
        records, wall = state["records"], state["wall"]
    rounds = cfg["rounds"]
    bar = tqdm(range(engine.round_idx, rounds), initial=engine.round_idx, total=rounds, disable=not progress,
               desc=f"{cfg['task']}/{cfg['method']['name']}", unit="round")
    status = "finished"
    for t in bar:
        t0 = time.perf_counter()
        info = engine.run_round()
        evaluated = (t + 1) % cfg["eval_every"] == 0 or t + 1 == rounds
        acc = engine.evaluate() if evaluated else {}
        wall += time.perf_counter() - t0
        for i, f in enumerate(exp.feds):
            rec = dict(round=t + 1, federation=i, seed=f.seed, variant=f.variant, loss=info["loss"][i],
                       up_bytes=info["up_bytes"], cum_up_bytes=info["cum_up_bytes"],
                       cum_down_bytes=info["cum_down_bytes"], wall_s=round(wall, 3))
            rec.update({f"acc_{k}": v[i] for k, v in acc.items()})
            records.append(rec)
        losses = info["loss"]
        if not all(math.isfinite(x) for x in losses):
            status = f"failed: non-finite training loss in round {t + 1} ({losses})"
            break
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", **{k: f"{np.mean(v):.3f}" for k, v in acc.items()})
        _atomic(metrics_path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in records)))
        _atomic(ckpt, lambda p: torch.save({"engine": engine.state_dict(), "records": records, "wall": wall}, p))
    summary = summarize(exp, engine, records, status, wall)
    if status == "finished" and engine.stacked.lora:      # LoRA methods: final global adapters (small), for export
        torch.save({"global": {k: v.cpu() for k, v in engine.global_state.items()},
                    "lora_scale": {n: l.scale.view(len(exp.feds), -1)[:, 0].cpu() for n, l in engine.stacked.lora.items()}},
                   out / "final_global.pt")
    (out / "env.json").write_text(json.dumps(environment(exp.device), indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ckpt.unlink(missing_ok=True)
    return summary


def _atomic(path, write):
    """Write to a temp file then rename: a run killed mid-write leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def summarize(exp, engine, records, status, wall):
    from fedsim.dp import epsilon_spent
    cfg = exp.cfg
    feds = []
    for i, f in enumerate(exp.feds):
        mine = [r for r in records if r["federation"] == i]
        evals = [r for r in mine if any(k.startswith("acc_") for k in r)]
        last = evals[-1] if evals else {}
        entry = dict(federation=i, seed=f.seed, variant=f.variant,
                     final={k[4:]: v for k, v in last.items() if k.startswith("acc_")},
                     final_loss=mine[-1]["loss"] if mine else None,
                     cum_up_bytes=mine[-1]["cum_up_bytes"] if mine else 0)
        if exp.dp is not None:
            entry.update(noise_multiplier=f.noise_multiplier, target_epsilon=exp.epsilons[i],
                         epsilon_spent=epsilon_spent(f.noise_multiplier, exp.dp.sample_rate, exp.steps_per_client,
                                                     cfg["dp"]["delta"], cfg["dp"]["accountant"]),
                         delta=cfg["dp"]["delta"], sample_rate=exp.dp.sample_rate,
                         steps_per_client=exp.steps_per_client)
        feds.append(entry)
    return dict(status=status, task=cfg["task"], method=cfg["method"]["name"], rounds_done=engine.round_idx,
                private=exp.dp is not None, wall_s=round(wall, 2), federations=feds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file (keys as in fedsim/config.py DEFAULTS)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override, e.g. dp.epsilon=3")
    ap.add_argument("--out", required=True, help="run directory")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, parse_set(args.set))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    summary = run(cfg, args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
