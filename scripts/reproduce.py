"""Regenerate every experiment family, then every table and figure.

    python -m scripts.reproduce [--profile smoke|quick|paper] [--only FAMILY ...] [--results DIR]

Which runs a family and profile hold is scripts/families.py (its docstring: the YAML layout).

Tuning: a run whose merged layers hold `tune: {grid: {sweepable key: [values]}, seeds: [...],
dev_fraction: f, set: {overrides of the tuning pass only, e.g. one epsilon}}` first runs that grid
(x the run's own sweep, x the tuning seeds) as federations of ONE pass, on its config with
`dev_fraction` of the training rows held out as split "dev"; the grid point with the best mean final dev
accuracy (over tuning seeds and the run's own sweep values, e.g. every epsilon) is then set in the run's
config. Every method of a family gets the same grid and protocol; the reported split
is never used to choose. The tuning pass lives in <results>/<family>/<profile>-tuning/<run-name>/ with
tuning.json (every grid point's score, the choice); the run's run.json says what was chosen. Tuning a
private run on the clients' data spends privacy that the reported epsilon does not count (as in most DP
papers): the results README says so.

Each run goes to <results>/<family>/<profile>/<run-name>/ through fedsim.run.run: a finished run is
skipped, a killed one resumes. Every run directory also gets run.json (family, profile, axis labels,
notes) for the figures step. A run that fedsim.run refuses before any compute (bad input, a run
directory of another config) is reported as "refused", not recorded as failed; a run that raises
later is recorded as failed (summary.json with status "failed: ...") and the sweep goes on; diverged
federations are recorded as failed by fedsim.run itself (the healthy ones still count).
Failed runs are skipped on the next call unless --retry-failed is given. A run whose config equals a
finished run of another family (e.g. rank r=8 = the ffa_table run) is copied from it, not rerun
(run.json says `copied_from`). A finished run whose saved config differs from configs/ is reported as
stale and left alone.

`make reproduce` runs everything again into results-rerun/ (never over the committed results/) and ends
with results-rerun/COMPARISON.md: every regenerated cell beside the committed one (scripts/compare.py).
The committed results/ were made with `python -m scripts.reproduce` (default root results/) from a
clean tree; `make figures` re-renders saved runs without training.

Profile: --profile, else $PROFILE, else `paper` when CUDA is available and `quick` otherwise.
Results root: --results, else $FEDSIM_RESULTS, else results/.
"""
import argparse
import copy
import itertools
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import yaml

from fedsim import config as C
from fedsim.files import atomic_write_text
from scripts.families import (CONFIG_DIR, PROFILES, build_config, deep_update, detect_profile, expand, load_families,
                              required, results_root)

# ----------------------------------------------------------------------------- running

def saved_config(path):
    """A run directory's config.yaml with the config keys added to DEFAULTS since it was written set to
    their defaults (a new key's default is the behaviour the code had before it existed), or None."""
    try:
        saved = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    cfg = copy.deepcopy(C.DEFAULTS)
    try:
        C._merge(cfg, saved)
    except (ValueError, KeyError, TypeError):
        return saved
    return cfg


TUNE_KEYS = ("grid", "seeds", "dev_fraction", "set")


def tuning_config(spec):
    """The config of a run's tuning pass: its own config, the grid added to its sweep, the tuning seeds,
    dev_fraction of the training rows held out."""
    tune = spec["tune"]
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    if unknown:
        raise ValueError(f"run {spec['name']}: unknown tune keys {unknown}; valid: {list(TUNE_KEYS)}")
    if not isinstance(tune.get("grid"), dict) or not tune["grid"]:
        raise ValueError(f"run {spec['name']}: tune.grid must map sweepable keys ({list(C.SWEEPABLE)}) to value lists")
    over = deep_update(copy.deepcopy(spec["overrides"]), tune.get("set", {}))   # e.g. tune at one epsilon
    own = dict(over.get("sweep", {}))
    clash = sorted(set(own) & set(tune["grid"]))
    if clash:
        raise ValueError(f"run {spec['name']}: tune.grid and sweep both set {clash}; tune one or sweep it")
    return build_config(over, {"sweep": {**own, **tune["grid"]},
                                            "seeds": tune.get("seeds", [100]),
                                            "dev_fraction": tune.get("dev_fraction", 0.15)})


def choose(summary, grid):
    """(chosen {key: value}, table): the grid point with the best mean final dev accuracy over its
    federations (tuning seeds x the run's own sweep values); a point with a failed federation scores
    None and is never chosen. Ties go to the first point in grid order."""
    keys = list(grid)
    table = []
    for point in itertools.product(*[grid[k] for k in keys]):
        feds = [f for f in summary["federations"]
                if all((f.get("variant") or {}).get(k) == v for k, v in zip(keys, point))]
        ok = [f for f in feds if f.get("status") == "finished" and (f.get("final") or {}).get("dev") is not None]
        score = sum(f["final"]["dev"] for f in ok) / len(ok) if ok and len(ok) == len(feds) else None
        table.append(dict(zip(keys, point), dev_accuracy=score, federations=len(feds), failed=len(feds) - len(ok)))
    scored = [row for row in table if row["dev_accuracy"] is not None]
    if not scored:
        raise RuntimeError(f"every grid point of the tuning pass failed: {table}")
    best = max(scored, key=lambda row: row["dev_accuracy"])      # max keeps the first of equal scores
    return {k: best[k] for k in keys}, table


def tune_one(family, profile, spec, root, runner):
    """Run (or reuse) a run's tuning pass; returns (overrides with the chosen values set, tuning record)."""
    cfg = tuning_config(spec)
    out = Path(root) / family / f"{profile}-tuning" / spec["name"]
    # tuned before (this run, or another run whose tuning pass is the same config, e.g. every partition of
    # a method tuned on one): reuse its scores, train nothing
    out = find_twin(root, f"{profile}-tuning", cfg, None) or out
    done = out / "summary.json"
    if done.exists() and saved_config(out / "config.yaml") == cfg:
        summary = json.loads(done.read_text())
    else:
        summary = runner(cfg, out, progress=False)
    if not summary.get("status", "").startswith(("finished", "failed: ")):
        raise RuntimeError(f"tuning pass {out}: {summary.get('status')}")
    chosen, table = choose(summary, spec["tune"]["grid"])
    record = dict(grid=spec["tune"]["grid"], seeds=cfg["seeds"], dev_fraction=cfg["dev_fraction"],
                  tuning_only=spec["tune"].get("set", {}),
                  split="dev (training rows held out from every client)", chosen=chosen, table=table,
                  tuning_dir=out.relative_to(Path(root)).as_posix())
    atomic_write_text(out / "tuning.json", json.dumps(record, indent=2) + "\n")
    over = copy.deepcopy(spec["overrides"])
    for k, v in chosen.items():
        section, key = k.split(".")
        over.setdefault(section, {})[key] = v
    return over, record


def run_one(family, profile, spec, root, retry_failed=False, runner=None, progress=True):
    """Run (or skip) one run, after its tuning pass if it has one; never raises for a failing run.
    Returns (status, seconds)."""
    from fedsim.run import RunError, run as fedsim_run
    runner = runner or fedsim_run
    t0 = time.perf_counter()
    if spec.get("tune"):
        try:
            overrides, record = tune_one(family, profile, spec, root, runner)
        except RunError as e:
            print(f"  REFUSED {family}/{spec['name']} (tuning): {e}", file=sys.stderr, flush=True)
            return f"refused: tuning: {e}", time.perf_counter() - t0
        except Exception as e:
            print(f"  FAILED {family}/{spec['name']} (tuning): {e}", file=sys.stderr, flush=True)
            return f"failed: tuning: {type(e).__name__}: {e}", time.perf_counter() - t0
        spec = dict(spec, overrides=overrides, tuned=dict(chosen=record["chosen"], tuning_dir=record["tuning_dir"]))
    status, _ = _run_tuned(family, profile, spec, root, retry_failed, runner, progress)
    return status, time.perf_counter() - t0


def _run_tuned(family, profile, spec, root, retry_failed, runner, progress):
    from fedsim.run import RunError
    out = Path(root) / family / profile / spec["name"]
    summary_path = out / "summary.json"
    t0 = time.perf_counter()
    meta = dict(family=family, profile=profile, name=spec["name"], labels=spec["labels"], notes=spec["notes"])
    if spec.get("tuned"):
        meta["tuned"] = spec["tuned"]
    if summary_path.exists():
        status = json.loads(summary_path.read_text()).get("status", "?")
        if (out / "config.yaml").exists() and saved_config(out / "config.yaml") != build_config(spec["overrides"]):
            return (f"stale: {out} was made with a different config (configs/ changed since); delete it to "
                    f"rerun", 0.0)
        if status == "finished" or not retry_failed:
            return status, 0.0
        summary_path.unlink()                     # retry: a checkpoint, if any, resumes the run
    try:
        cfg = build_config(spec["overrides"])
        if (out / "config.yaml").exists():
            if saved_config(out / "config.yaml") != cfg:
                raise RunError(f"{out} holds a run of a different config (configs/ changed since); "
                               f"delete that directory to rerun it")
        out.mkdir(parents=True, exist_ok=True)
        twin = find_twin(root, profile, cfg, out)
        if twin is not None:                      # the same experiment in another family: reuse, don't rerun
            meta["copied_from"] = twin.relative_to(Path(root)).as_posix()
            atomic_write_text(out / "run.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
            for f in TWIN_FILES:
                if (twin / f).exists():
                    shutil.copyfile(twin / f, out / f)
            shutil.copyfile(twin / "summary.json", out / "summary.json")       # last: marks it finished
            return "finished", time.perf_counter() - t0
        atomic_write_text(out / "run.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if not (out / "partitions.csv").exists():
            atomic_write_text(out / "partitions.csv", partition_csv(cfg))
        summary = runner(cfg, out, progress=progress)
        status = summary.get("status", "?")
    except RunError as e:                       # refused before any compute: report, write nothing there
        status = f"refused: {e}"
        print(f"  REFUSED {family}/{spec['name']}: {e}", file=sys.stderr, flush=True)
    except Exception as e:                      # record and go on; KeyboardInterrupt still stops the sweep
        status = f"failed: {type(e).__name__}: {e}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "run.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        fail = dict(status=status, task=spec["overrides"].get("task"),
                    method=spec["overrides"].get("method", {}).get("name"), federations=[],
                    error=traceback.format_exc(limit=8)[-4000:])
        atomic_write_text(summary_path, json.dumps(fail, indent=2) + "\n")
        print(f"  FAILED {family}/{spec['name']}: {status}", file=sys.stderr, flush=True)
    return status, time.perf_counter() - t0


TWIN_FILES = ("config.yaml", "metrics.jsonl", "env.json", "final_global.pt", "partitions.csv")


def find_twin(root, profile, cfg, exclude):
    """A finished run of this profile (any family) with exactly this config, or None."""
    for cy in sorted(Path(root).glob(f"*/{profile}/*/config.yaml")):
        d = cy.parent
        if d == exclude or not (d / "summary.json").exists():
            continue
        try:
            if json.loads((d / "summary.json").read_text()).get("status") == "finished" and saved_config(cy) == cfg:
                return d
        except (OSError, ValueError, yaml.YAMLError):
            continue
    return None


def partition_csv(cfg):
    """Per-client label counts of every federation's split (long CSV: seed, client, size, labels...)."""
    import pandas as pd

    from fedsim.tasks import get_task, load_labels
    from partitions import make_partition, partition_table
    task = get_task(cfg["task"])
    labels = load_labels(task, data_dir=cfg["data_dir"], subsample=cfg["train_subsample"])
    pcfg = dict(cfg["partition"])
    name = pcfg.pop("name")
    tables = []
    for seed in cfg["seeds"]:
        t = partition_table(make_partition(name, labels, cfg["num_clients"], seed, **pcfg), labels,
                            list(task.label_names)).reset_index()
        t.insert(0, "seed", seed)
        tables.append(t)
    return pd.concat(tables).to_csv(index=False, lineterminator="\n")


def plan(families, profile, only=None):
    """[(family, spec)] in order, other families' required runs first, without duplicates."""
    unknown = sorted(set(only or []) - set(families))
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; valid: {list(families)}")
    chosen = [f for f in families if (not only or f in only) and profile in families[f].get("profiles", {})]
    todo, seen = [], set()
    for fam in chosen:
        for dep, names in required(families[fam], profile, families).items():
            for spec in expand(families[dep], profile):
                if spec["name"] in names and (dep, spec["name"]) not in seen:
                    seen.add((dep, spec["name"]))
                    todo.append((dep, spec))
        for spec in expand(families[fam], profile):
            if (fam, spec["name"]) not in seen:
                seen.add((fam, spec["name"]))
                todo.append((fam, spec))
    return chosen, todo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, help="default: $PROFILE, else paper with CUDA, else quick")
    ap.add_argument("--only", nargs="+", metavar="FAMILY", help="run only these families (and the runs they read)")
    ap.add_argument("--results", help="results root (default: $FEDSIM_RESULTS or results/)")
    ap.add_argument("--configs", default=str(CONFIG_DIR), help="directory of family YAML files")
    ap.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    ap.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    ap.add_argument("--no-figures", action="store_true", help="skip the figures step")
    ap.add_argument("--compare", metavar="DIR", help="at the end, compare every regenerated cell with the results "
                    "under DIR (e.g. the committed results/) -> <results>/COMPARISON.md")
    args = ap.parse_args(argv)
    profile = detect_profile(args.profile)
    root = results_root(args.results)
    families = load_families(args.configs)
    try:
        chosen, todo = plan(families, profile, args.only)
        for _, spec in todo:                        # every config is checked before any compute
            build_config(spec["overrides"])
            if spec.get("tune"):
                tuning_config(spec)
    except ValueError as e:
        sys.exit(f"reproduce: {e}")
    print(f"profile {profile}: {len(todo)} runs in families {chosen} -> {root}", flush=True)
    for fam in [f for f in families if (not args.only or f in args.only) and f not in chosen]:
        print(f"  {fam}: no {profile} profile (see {families[fam]['_path']})", flush=True)
    if args.dry_run:
        for fam, spec in todo:
            print(f"  {fam}/{profile}/{spec['name']}")
        return 0
    t_all = time.perf_counter()
    failed = []
    for i, (fam, spec) in enumerate(todo, 1):
        status, secs = run_one(fam, profile, spec, root, retry_failed=args.retry_failed,
                               progress=sys.stderr.isatty())
        print(f"[{i}/{len(todo)}] {fam}/{spec['name']}: {status} ({secs:.0f} s)", flush=True)
        if status != "finished":
            failed.append((fam, spec["name"], status))
    print(f"runs done in {time.perf_counter() - t_all:.0f} s; {len(failed)} not finished", flush=True)
    for fam, name, status in failed:
        print(f"  {fam}/{name}: {status}", flush=True)
    if not args.no_figures:
        from scripts import figures
        figures.main(["--results", str(root), "--profile", profile, "--configs", args.configs])
    if args.compare:
        from scripts import compare
        compare.main([args.compare, str(root), "--profile", profile])
    return 0


if __name__ == "__main__":
    sys.exit(main())
