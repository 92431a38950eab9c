"""Run one experiment from a config: data -> partitions -> model -> engine rounds -> results on disk.

    python -m fedsim.run --config configs/smoke.yaml --set dp.epsilon=3 --out results/scratch/run1

The run directory gets config.yaml (resolved, with its config hash), metrics.jsonl (one line per round and
federation), summary.json, env.json (git commit, times, device, CPU, threads, versions, model and data sha256)
and, while running, checkpoint.pt, so a killed run resumes where it stopped and ends with the same numbers.

A private federation's summary entry holds noise_multiplier, target_epsilon, epsilon_spent, clip_only, delta,
sample_rate and steps_per_client. dp.epsilon .inf (clip only: the DP schedule with sigma = 0) is written
target_epsilon "inf", epsilon_spent "inf", noise_multiplier 0.0, clip_only true, and "inf" in its variant:
every file stays strict JSON (no bare Infinity).

Trust rules:
- Bad input (config, data, model, run directory) fails before any compute with one line naming the fix
  (exit status 2) and leaves an existing run directory untouched.
- A run resumes only under the config it started with (keys in config.RESULT_NEUTRAL, such as device and
  replica_chunk, may change): anything else is refused, naming the keys that differ.
- A federation whose loss, update or (under DP) per-sample gradient becomes non-finite is frozen and
  marked failed; the others finish. The process then exits with status 1 and one line per failed
  federation. A finished run is skipped; a run with failed federations is reported again, and
  --retry-failed runs it again from round 0.
"""
import argparse
import datetime
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from fedsim.config import config_diff, config_hash, federations, load_config, parse_set
from fedsim.autochunk import choose_replica_chunk
from fedsim.engine import DPSetup, Federation, build_engine
from fedsim.files import atomic_write
from fedsim.provenance import cpu_has_native_bf16, environment, file_sha256, model_record
from fedsim.rng import numpy_rng
from fedsim.sampling import PoissonOverflowError



# Files that scripts/reproduce writes into a run directory before the run starts.
BOOKKEEPING = ("run.json", "partitions.csv")


# What a run's epsilon protects, by dp.unit (summary.json's `protects`)
PROTECTS = {"sample": "one training sample (DP-SGD: per-sample clipping; q = expected batch / client size, "
                      "steps = rounds x local steps)",
            "client": "one client's whole dataset (DP-FedAvg: per-client update clipping; q = clients per round / "
                      "clients, steps = rounds)"}


class RunError(ValueError):
    """A run that cannot start or go on as asked (bad input, a damaged or foreign run directory): the CLI
    prints its message as one line and exits with status 2."""


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA device; use device=auto or cpu")
    return torch.device(name)


class Experiment:
    """Everything built from a config, validated before compute."""

    def __init__(self, cfg):
        from fedsim.dp import (ClientDPSetup, json_epsilon, max_poisson_batch, noise_multiplier_for,
                               update_noise_multiplier)
        from fedsim.sampling import clients_per_round
        from fedsim.models import resolve_pooling
        from fedsim.tasks import get_task, load_split
        from methods import method_for
        from partitions import dev_split, hold_out, make_partition

        self.cfg = cfg
        self.task = get_task(cfg["task"])
        self.pooling = resolve_pooling(cfg["model"], cfg["pooling"])   # "auto" -> the backbone's own
        self.method = method_for(cfg)                                   # unknown method/params: error now
        labels = load_split(self.task, self.task.train_split, data_dir=cfg["data_dir"],
                            subsample=cfg["train_subsample"], strip_metadata=cfg["strip_metadata"])["label"].to_numpy()
        self.train_rows, self.dev_rows = dev_split(len(labels), cfg["dev_fraction"])
        # a run with a dev split (a tuning pass) is scored on it alone: it never sees the reported split
        self.eval_splits = {"dev": None} if len(self.dev_rows) else {
            name: split for name, split in self.task.eval_splits.items()
            if cfg["eval_splits"] is None or name in cfg["eval_splits"]}
        # the curve subsets' names (<split>_curve) when evaluations before the last score a subset, else None
        self.curve_splits = [name + CURVE for name in self.eval_splits] \
            if cfg["curve_eval_subsample"] and not len(self.dev_rows) else None
        pcfg = dict(cfg["partition"])
        pname = pcfg.pop("name")
        self.federations = []
        for seed, variant in federations(cfg):      # clients split the training rows (dev rows excluded)
            parts, held = hold_out([self.train_rows[p] for p in make_partition(
                pname, labels[self.train_rows], cfg["num_clients"], seed, **pcfg)], cfg["personal_eval_fraction"], seed)
            self.federations.append(Federation(seed=seed, lr=variant.get("optimizer.lr", cfg["optimizer"]["lr"]),
                                               lora_alpha=variant.get("lora.alpha", cfg["lora"]["alpha"]),
                                               max_grad_norm=variant.get("dp.max_grad_norm"), partitions=parts,
                                               server_lr=variant.get("server.lr", cfg["server"]["lr"]),
                                               variant={k: json_epsilon(v) for k, v in variant.items()},
                                               personal_eval=held))
        self.dp, self.client_dp, self.epsilons = None, None, [None] * len(self.federations)
        dp = cfg["dp"]
        eps_list = [v.get("dp.epsilon", dp["epsilon"]) for _, v in federations(cfg)]
        if any(e is not None for e in eps_list) and dp["unit"] == "client":
            # DP-FedAvg: one release per round, each client in it with probability q = clients per round / clients
            per_round = clients_per_round(cfg["num_clients"], cfg["client_fraction"])
            self.sample_rate, self.steps_per_client = per_round / cfg["num_clients"], cfg["rounds"]
            adaptive = dp["target_quantile"] is not None
            count_stddev = (dp["clipped_count_stddev"] or per_round / 20) if adaptive else None
            for f, eps in zip(self.federations, eps_list):
                f.noise_multiplier = noise_multiplier_for(eps, dp["delta"], self.sample_rate, self.steps_per_client,
                                                          dp["accountant"])
                update_noise_multiplier(f.noise_multiplier, count_stddev)     # too little to split: error now
            self.epsilons = eps_list
            self.client_dp = ClientDPSetup(max_update_norm=dp["max_update_norm"], target_quantile=dp["target_quantile"],
                                           clip_lr=dp["clip_lr"], count_stddev=count_stddev)
        elif any(e is not None for e in eps_list):
            # q = expected batch / mean client size. Partitions cover every row, so the mean client size is
            # rows / clients for every seed: q never depends on which federations share the pass.
            q = min(1.0, cfg["batch_size"] * cfg["num_clients"] / len(self.train_rows))
            sizes = [len(p) for f in self.federations for p in f.partitions]     # max_batch: padding only, exact
            self.steps_per_client = cfg["rounds"] * cfg["local_steps"]   # upper bound: every round sampled
            self.sample_rate = q
            for f, eps in zip(self.federations, eps_list):
                f.noise_multiplier = noise_multiplier_for(eps, dp["delta"], q, self.steps_per_client, dp["accountant"])
            self.epsilons = eps_list
            self.dp = DPSetup(max_grad_norm=dp["max_grad_norm"], sample_rate=q, head_share=dp["head_share"],
                              max_batch=max_poisson_batch(q * max(sizes), dp["max_batch_factor"]))
        self.device = resolve_device(cfg["device"])

    def build(self):
        """Model, tokenized tensors, stacked replicas, engine (no training compute yet)."""
        from fedsim.models import load_backbone
        from fedsim.tasks import load_tokenized
        cfg = self.cfg
        model, tok = load_backbone(cfg["model"], num_labels=self.task.num_labels,
                                   num_hidden_layers=cfg["num_hidden_layers"], seed=0, pooling=self.pooling)
        # seed=0, not a federation's: this shared model's own head is never used, every federation's head
        # is drawn from its own seed by the method's init_global
        kw = dict(max_length=cfg["max_length"], padding=cfg["padding"], data_dir=cfg["data_dir"],
                  strip_metadata=cfg["strip_metadata"])
        train = load_tokenized(self.task, self.task.train_split, tok, subsample=cfg["train_subsample"], **kw)
        if len(self.dev_rows):                   # held-out training rows: what tuning scores on
            dev = torch.as_tensor(np.sort(self.dev_rows[:cfg["eval_subsample"]]))
            evals = {"dev": {k: v[dev] for k, v in train.items()}}
        else:
            evals = {name: load_tokenized(self.task, split, tok, subsample=cfg["eval_subsample"], **kw)
                     for name, split in self.eval_splits.items()}
            evals.update(curve_subsets(evals, cfg["curve_eval_subsample"]))
        if self.device.type == "cuda":
            train = {k: v.pin_memory() for k, v in train.items()}
            evals = {s: {k: v.to(self.device) for k, v in d.items()} for s, d in evals.items()}
        return build_engine(self.method, model, train, self.federations, local_steps=cfg["local_steps"],
                            batch_size=cfg["batch_size"], client_fraction=cfg["client_fraction"],
                            optimizer=cfg["optimizer"], dp=self.dp, replica_chunk=cfg["replica_chunk"],
                            device=self.device, eval_sets=evals, eval_batch_size=cfg["eval_batch_size"],
                            precision=cfg["precision"],
                            server={k: v for k, v in cfg["server"].items() if k != "lr"}, client_dp=self.client_dp)

    def tune(self, engine):
        """Replicas per forward/backward unless the config fixes it: all of them on a GPU; on a CPU a
        divisor of the clients per round, measured (compute: runs steps), so that a federation computes
        exactly what it computes alone (fedsim/autochunk.py)."""
        if self.cfg["replica_chunk"] is not None or self.device.type != "cpu":
            return
        if engine.clients_per_round == 1:
            engine.chunk = 1
        else:
            choose_replica_chunk(engine, engine.train["input_ids"].shape[1])


def run(cfg, out_dir, progress=True, retry_failed=False):
    """Run (or resume, or skip if finished) one experiment into out_dir. Returns the summary dict.

    Raises RunError (before anything in out_dir changes) for bad input or an unusable run directory."""
    started = utc_now()
    out = Path(out_dir)
    ckpt, metrics_path, summary_path = out / "checkpoint.pt", out / "metrics.jsonl", out / "summary.json"
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose a directory path")
    try:                                          # data, partitions, DP calibration, model: every input check
        exp = Experiment(cfg)
        engine = exp.build()
    except (ValueError, FileNotFoundError) as e:
        raise RunError(str(e)) from e
    _check_run_dir(out, cfg)
    retry = False
    if summary_path.exists():
        summary = _read(summary_path, json.loads, "summary.json")
        if summary.get("status") == "finished" or not retry_failed:
            return summary
        retry = True                              # run it again from round 0, once every check below passed
    state = None
    if ckpt.exists() and not retry:
        state = _read(ckpt, lambda b: torch.load(io.BytesIO(b), weights_only=False), "checkpoint.pt", binary=True)
        if not isinstance(state, dict) or not {"engine", "records", "wall"} <= set(state):
            raise RunError(f"{ckpt} is not a fedsim checkpoint; delete it to restart the run from round 0")
        if state.get("config_hash", config_hash(cfg)) != config_hash(cfg):
            diff = config_diff(state["config"], cfg)
            raise RunError(f"{out} was checkpointed under another config ({'; '.join(diff) or 'hash differs'}); "
                           f"resuming would mix two configs: use a new --out, or delete {out} to start over")
    # ---- every check passed: from here on the run directory changes
    out.mkdir(parents=True, exist_ok=True)
    if retry:
        for f in (summary_path, out / "final_global.pt", ckpt):
            f.unlink(missing_ok=True)
    if not (out / "config.yaml").exists():
        atomic_write(out / "config.yaml", lambda p: p.write_text(
            f"# fedsim resolved config; config_hash {config_hash(cfg)} (see fedsim/config.py)\n"
            + yaml.safe_dump(cfg, sort_keys=False)))
    records, wall, code = [], 0.0, []
    if state is not None:
        engine.load_state_dict(state["engine"])
        records, wall, code = state["records"], state["wall"], state.get("code", [])
    # the code that computed the rounds, oldest first: a run resumed after a new commit says so in env.json
    env = environment(exp.device)
    env["started"] = started                          # this invocation; a resumed run keeps code_by_round too
    env.update(inputs(cfg, exp))
    version = (env["git_commit"], env["git_dirty"])
    if not code or (code[-1]["git_commit"], code[-1]["git_dirty"]) != version:
        code = code + [dict(git_commit=version[0], git_dirty=version[1], from_round=engine.round_idx + 1)]
    if state is not None and cfg["replica_chunk"] is None and state.get("replica_chunk"):
        engine.chunk = state["replica_chunk"]      # resume with the GEMM shapes the earlier rounds used
    else:
        try:
            exp.tune(engine)
        except PoissonOverflowError as e:
            raise _overflow(e, cfg, engine) from e
    env["replica_chunk"] = engine.chunk              # a chunk change alters float rounding: record it
    env["precision"] = engine.precision              # what precision: auto resolved to on this device
    if engine.precision == "bf16" and exp.device.type == "cpu" and cpu_has_native_bf16() is False:
        print("warning: precision=bf16 on a CPU without native bf16 matmuls (no avx512_bf16 or amx_bf16 flag): "
              "bf16 is emulated there and slower than fp32; set precision=fp32", file=sys.stderr)
    rounds = cfg["rounds"]
    bar = tqdm(range(engine.round_idx, rounds), initial=engine.round_idx, total=rounds, disable=not progress,
               desc=f"{cfg['task']}/{cfg['method']['name']}", unit="round")
    for t in bar:
        if len(engine.failed) == len(exp.federations):
            break                                 # every federation failed: nothing left to train
        t0 = time.perf_counter()
        try:
            info = engine.run_round()
        except PoissonOverflowError as e:
            raise _overflow(e, cfg, engine) from e
        evaluated = (t + 1) % cfg["eval_every"] == 0 or t + 1 == rounds
        # before the last round only the curve subsets (when the config has them); the last round scores all
        acc = engine.evaluate(None if t + 1 == rounds else exp.curve_splits) if evaluated else {}
        # None without held-out client rows; with curve subsets, a final-only number (the curves are global)
        personal = engine.evaluate_personal() if evaluated and (t + 1 == rounds or not exp.curve_splits) else None
        if personal:
            acc["personal"] = personal[0]
        wall += time.perf_counter() - t0
        for i, f in enumerate(exp.federations):
            if i in engine.failed and i not in info["failed"]:
                continue                          # failed in an earlier round: no more records
            rec = dict(round=t + 1, federation=i, seed=f.seed, variant=f.variant, loss=info["loss"][i],
                       up_bytes=info["up_bytes"][i], cum_up_bytes=info["cum_up_bytes"][i],
                       cum_down_bytes=info["cum_down_bytes"][i], wall_s=round(wall, 3))
            if info["update_clip"] is not None:          # client-level DP: the update clip this round used
                rec["update_clip"] = info["update_clip"][i]
            if i in info["failed"]:
                rec["failed"] = info["failed"][i]
                rec.update({f"acc_{k}": None for k in [*exp.eval_splits, *(exp.curve_splits or [])]})
            else:
                rec.update({f"acc_{k}": v[i] for k, v in acc.items()})
                if personal:
                    rec["personal_per_client"] = personal[1][i]
            records.append(rec)
        healthy = [i for i in range(len(exp.federations)) if i not in engine.failed]
        bar.set_postfix(loss=f"{np.mean([info['loss'][i] for i in healthy]):.3f}" if healthy else "-",
                        **{k: f"{np.mean([v[i] for i in healthy]):.3f}" for k, v in acc.items() if healthy})
        atomic_write(metrics_path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in records)))
        atomic_write(ckpt, lambda p: torch.save({"engine": engine.state_dict(), "records": records, "wall": wall,
                                            "config": cfg, "config_hash": config_hash(cfg), "code": code,
                                            "replica_chunk": engine.chunk}, p))
    summary = summarize(exp, engine, records, wall)
    if engine.stacked.lora:                      # LoRA methods: final global adapters (small), for export
        atomic_write(out / "final_global.pt", lambda p: torch.save(
            {"global": {k: v.cpu() for k, v in engine.global_state.items()},
             "lora_scale": {n: l.scale.view(len(exp.federations), -1)[:, 0].cpu() for n, l in engine.stacked.lora.items()}},
            p))
    if len(code) > 1:                            # resumed under other code: every version that computed rounds
        env["code_by_round"] = code
    env["finished"] = utc_now()
    atomic_write(out / "env.json", lambda p: p.write_text(json.dumps(env, indent=2)))
    atomic_write(summary_path, lambda p: p.write_text(json.dumps(summary, indent=2)))
    ckpt.unlink(missing_ok=True)
    return summary


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def inputs(cfg, exp):
    """What the run read: the backbone (package versions, weights' sha256) and each data file's sha256
    (training split and every evaluation split; "hub" where the file came from the Hugging Face hub)."""
    from fedsim.models import model_packages, resolve_model
    from fedsim.tasks import find_split_file
    # a tuning pass's "dev" split is held-out training rows (split None): the training file covers it
    splits = [exp.task.train_split] + sorted({s for s in exp.eval_splits.values() if s is not None})
    data = {}
    for split in splits:
        path = find_split_file(exp.task, split, cfg["data_dir"])
        # the file as the data README names it (<task dir>/<split>.parquet): the same on every machine
        data[split] = "hub" if path is None else {"file": f"{path.parent.name}/{path.name}",
                                                  "sha256": file_sha256(path)}
    return {"model": model_record(resolve_model(cfg["model"])[0], model_packages(cfg["model"])), "data": data}


def _overflow(e, cfg, engine):
    return RunError(f"{e}; dp.max_batch_factor is {cfg['dp']['max_batch_factor']} now: rerun with a larger "
                    f"one and the same --out to resume from round {engine.round_idx + 1}")


def _check_run_dir(out, cfg):
    """The run directory must be new, or a run of this config (keys in RESULT_NEUTRAL may differ)."""
    if not out.is_dir():
        return
    if not (out / "config.yaml").exists():
        others = sorted(p.name for p in out.iterdir() if p.name not in BOOKKEEPING)
        if others:
            raise RunError(f"{out} holds files but no fedsim run (no config.yaml; found {others[:3]}); "
                           f"choose a new --out")
        return
    old = _read(out / "config.yaml", yaml.safe_load, "config.yaml")
    diff = config_diff(old, cfg) if isinstance(old, dict) else ["(unreadable)"]
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise RunError(f"{out} holds a run of another config ({shown}); resuming would mix two configs: "
                       f"use a new --out, or delete {out} to start over")


def _read(path, parse, what, binary=False):
    """parse(file content), or a RunError naming the file and the fix if it cannot be read or parsed."""
    try:
        return parse(path.read_bytes() if binary else path.read_text())
    except Exception as e:                    # truncated, empty, not the format: say which file and what to do
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]       # its first sentence
        fix = ("delete it to restart the run from round 0" if what == "checkpoint.pt" else
               f"delete {path.parent} (or choose a new --out) to start the run over")
        raise RunError(f"cannot read {path} ({type(e).__name__}{': ' + first if first else ''}): the {what} is "
                       f"damaged; {fix}") from e


CURVE = "_curve"      # suffix of an eval split's curve subset (its metrics: acc_<split>_curve)


def curve_subsets(evals, rows):
    """{<split>_curve: the tokenized rows of a keyed random subset of `rows` rows of each split} (all of a
    split's rows when it has fewer), or {} when rows is None. The same rows at every evaluation and for every
    federation, so a learning curve compares like with like while each point costs `rows` rows, not the split."""
    if not rows:
        return {}
    out = {}
    for name, data in evals.items():
        n = len(data["labels"])
        keep = torch.as_tensor(np.sort(numpy_rng("curve eval", name, n).permutation(n)[:rows]))
        out[name + CURVE] = {k: v[keep] for k, v in data.items()}
    return out


def summarize(exp, engine, records, wall):
    """summary.json: status, then per federation its final accuracies (null if it failed), loss, bytes, epsilon."""
    from fedsim.dp import clip_only, epsilon_spent, json_epsilon
    from fedsim.evaluation import personal_majority_accuracy
    cfg = exp.cfg
    private = exp.dp is not None or exp.client_dp is not None
    feds = []
    # each client's own majority label on its held-out rows: what a personalized accuracy must beat
    majority = personal_majority_accuracy(engine.train["labels"], exp.federations)
    for i, f in enumerate(exp.federations):
        mine = [r for r in records if r["federation"] == i]
        evals = [r for r in mine if any(k.startswith("acc_") for k in r)]
        last = evals[-1] if evals else {}
        failure = engine.failed.get(i)
        entry = dict(federation=i, seed=f.seed, variant=f.variant, status="failed" if failure else "finished",
                     final=None if failure else {k[4:]: v for k, v in last.items() if k.startswith("acc_")},
                     final_loss=None if failure or not mine else mine[-1]["loss"],
                     cum_up_bytes=mine[-1]["cum_up_bytes"] if mine else 0)
        if failure:
            entry["failure"] = dict(failure)
        elif last.get("personal_per_client") is not None:       # each client's own model on its held-out rows
            entry["final_personal_per_client"] = last["personal_per_client"]
        if majority:
            entry["personal_majority"], entry["personal_majority_per_client"] = majority[0][i], majority[1][i]
        if private:   # clip only (epsilon .inf): sigma 0, epsilon "inf" (strict JSON has no Infinity)
            spent = epsilon_spent(f.noise_multiplier, exp.sample_rate, exp.steps_per_client, cfg["dp"]["delta"],
                                  cfg["dp"]["accountant"])
            entry.update(noise_multiplier=f.noise_multiplier, target_epsilon=json_epsilon(exp.epsilons[i]),
                         epsilon_spent=json_epsilon(spent), clip_only=clip_only(exp.epsilons[i]),
                         delta=cfg["dp"]["delta"], sample_rate=exp.sample_rate,
                         steps_per_client=exp.steps_per_client)
        feds.append(entry)
    n_failed = len(engine.failed)
    status = "finished" if not n_failed else f"failed: {n_failed} of {len(feds)} federations diverged"
    return dict(status=status, task=cfg["task"], method=cfg["method"]["name"], pooling=exp.pooling,
                rounds_done=engine.round_idx, private=private, wall_s=round(wall, 2), federations=feds,
                **(dict(dp_unit=cfg["dp"]["unit"], protects=PROTECTS[cfg["dp"]["unit"]]) if private else {}))


def failure_lines(summary):
    """One line per failed federation of a summary."""
    out = []
    for f in summary.get("federations", []):
        if f.get("status") == "failed":
            variant = "".join(f", {k}={v}" for k, v in (f.get("variant") or {}).items())
            out.append(f"federation {f['federation']} (seed {f['seed']}{variant}) failed: {f['failure']['reason']}")
    return out


def _one_line(msg):
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def main(argv=None):
    """CLI. Exit status: 0 every federation finished; 1 a federation failed (diverged); 2 bad input."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file (keys as in fedsim/config.py DEFAULTS)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override, e.g. dp.epsilon=3")
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--retry-failed", action="store_true",
                    help="run again, from round 0, a finished run directory whose summary has failed federations")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, parse_set(args.set))
        summary = run(cfg, args.out, progress=sys.stderr.isatty(), retry_failed=args.retry_failed)
    except (ValueError, FileNotFoundError) as e:         # config errors and RunError: one line, no traceback
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume {args.out} from its last finished round",
              file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    failed = failure_lines(summary)
    for line in failed:
        print(line, file=sys.stderr)
    if failed:
        print(f"{args.out}: {len(failed)} federation(s) failed; their accuracies are null. The same code and "
              f"config fail the same way: change the config under a new --out, or rerun with --retry-failed "
              f"to run it again from round 0", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
