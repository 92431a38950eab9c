"""Regenerate every experiment family, then every table and figure.

    python -m scripts.reproduce [--profile smoke|quick|paper] [--only FAMILY ...] [--results DIR] [--compare DIR]

Which runs a family and profile hold is scripts/families.py (its docstring: the YAML layout). --only names
families that have a section for the profile (anything else: one line naming the valid ones, nothing run).

Tuning: a run whose merged layers hold `tune: {grid: {sweepable key: [values]}, seeds: [...],
dev_fraction: f, set: {overrides of the tuning pass only, e.g. one epsilon}, extend: N, tie_within: x}` first
runs that grid (x the run's own sweep, x the tuning seeds) as federations of ONE pass, on its config with
`dev_fraction` of the training rows held out as split "dev"; the grid point with the best mean final dev
accuracy (over tuning seeds and the run's own sweep values, e.g. every epsilon; equal scores: the first in
grid order) is then set in the run's config. Every method of a family gets the same grid and protocol; the
reported split is never used to choose.
- extend: N (default 0: the grid as given). While the chosen value of a numeric grid key is the smallest
  (largest) of the values run, one more point beyond it is run, at the ratio of the two outermost values on
  that side (0.002, 0.005 -> 0.0008; their step instead when a value is <= 0), as a tuning pass of its own
  in <run-name>-ext<i>/ beside the first pass, and every point run so far is scored again; at most N times.
  A choice still at an edge after that is marked "limit reached": the best may lie beyond.
- tie_within: x (default 0: no tie rule). The points whose mean dev accuracy is within x of the best
  (accuracy as a fraction, 0.005 = half a point) are tied, and the median of them in grid order is chosen
  (the lower middle one of an even count): among points the dev split cannot tell apart, the middle one,
  not whichever edge noise favoured.
- score: dev (default) or personal. What a tuning pass is scored on: the global model on the dev split, or,
  for a method whose reported accuracy is personalized (FedSA-LoRA), each client's own model on rows held
  out of its data in the tuning pass (personal_eval_fraction > 0; the tuning pass's own partition and rows,
  never the reported run's).
The tuning passes live in <results>/<family>/<profile>-tuning/<run-name>[-ext<i>]/; the first one holds
tuning.json: grid (the values run, extensions included), grid_configured, table (every point run: its
score, federations, failed ones), score, split, chosen, tie_rule (tie_within, the rule in words, the tied points),
extend, extensions ([{key, side, value, tuning_dir}]), at_edge ([{key, side}] of the choice), limit_reached,
stopped (why an extension could not be made, else null), seeds, dev_fraction, tuning_only, tuning_dir.
The run's run.json says what was chosen. Tuning a private run on the clients' data spends privacy that the
reported epsilon does not count (as in most DP papers): the results README says so.

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

Plan and progress: before running, each family's number of runs (tuning passes counted) and estimated
minutes are printed, and a total: the estimate of a run is its twin's (the same family, profile and run
name under --compare DIR, else results/) summary.json wall_s plus its tuning passes' wall_s; no twin: "no
estimate"; a run already done in the results root: 0. During the sweep one overall progress bar (on a
terminal) counts runs, its ETA the remaining estimates scaled by measured / estimated seconds of the runs
computed so far, above each run's own bar; every run also prints "[i/n] family/run: status (seconds)".

Timing: after each run, <results>/<family>/<profile>/timing.json is updated (merged with the file an
earlier invocation wrote, so a resumed sweep keeps the seconds of the runs computed before; no run is
counted twice). Fields:
  family, profile
  wall_s               sum of the runs' wall_s: the family's compute time, each run counted once
  runs_without_wall_s  runs never computed by an invocation that wrote timing.json (made earlier, copied)
  invocation           the latest invocation: started (ISO time), wall_s (the wall clock around its run_one
                       calls of this family: runs, tuning passes, setup and tokenization), computed, reused
                       (how many runs)
  runs                 {run name: {wall_s, computed_at, status, this_invocation, invocation_s}}: wall_s the
                       seconds of the run_one call that computed it (its tuning passes included; null if
                       none did), computed_at that invocation's start, status after the latest invocation,
                       this_invocation "computed" | "skipped" | "copied" and invocation_s its seconds there.
A run killed mid-way and resumed counts only the invocation that finished it.

`make reproduce` runs everything again into results-rerun/ (never over the committed results/) and ends
with results-rerun/COMPARISON.md: every regenerated cell beside the committed one (scripts/compare.py).
The committed results/ were made with `python -m scripts.reproduce` (default root results/) from a
clean tree; `make figures` re-renders saved runs without training.

Profile: --profile, else $PROFILE, else `paper` when CUDA is available and `quick` otherwise.
Results root: --results, else $FEDSIM_RESULTS, else results/.
"""
import argparse
import copy
import datetime
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
from scripts.families import (CONFIG_DIR, PROFILES, build_config, deep_update, detect_profile, expand,
                              load_families, required, results_root, with_profile)

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


TUNE_KEYS = ("grid", "seeds", "dev_fraction", "set", "extend", "tie_within", "score")
# what a tuning pass is scored on: the global model on the dev split, or (a personalized method, e.g. FedSA-LoRA,
# whose reported accuracy is each client's own model) each client's model on rows held out of its own data
SCORES = {"dev": "dev (training rows held out from every client)",
          "personal": "personal (each client's own model on rows held out of its data in the tuning pass)"}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tune_protocol(spec):
    """(extend, tie_within) of a run's tune block, checked before any compute: extend is how many points may
    be added beyond an edge of the grid (0: the grid as given), tie_within the accuracy gap that counts as a
    tie (0: no tie rule). Extending needs numeric grid values (the next point is computed from them)."""
    tune, name = spec["tune"], spec["name"]
    extend, tie = tune.get("extend", 0), tune.get("tie_within", 0)
    if not _is_number(extend) or extend != int(extend) or extend < 0:
        raise ValueError(f"run {name}: tune.extend must be a whole number >= 0, the most points added beyond "
                         f"an edge of the grid, e.g. 2 (got {extend!r})")
    if not _is_number(tie) or not 0 <= tie < 1:
        raise ValueError(f"run {name}: tune.tie_within must be an accuracy gap in [0, 1), e.g. 0.005 for half "
                         f"a point (got {tie!r})")
    if extend:
        values = [v for vals in tune["grid"].values() if isinstance(vals, list) for v in vals]
        if not all(_is_number(v) for v in values):
            raise ValueError(f"run {name}: tune.extend needs numeric grid values (got {tune['grid']}); "
                             f"drop extend or list numbers")
        if not any(isinstance(vals, list) and len(set(vals)) >= 2 for vals in tune["grid"].values()):
            raise ValueError(f"run {name}: tune.extend needs a grid key with at least 2 values (the step beyond "
                             f"an edge is taken from the two outermost); add a value or drop extend")
    return int(extend), float(tie)


def tuning_config(spec, grid=None):
    """The config of a run's tuning pass: its own config, the grid (default: tune.grid; an extension pass
    gives its own) added to its sweep, the tuning seeds, dev_fraction of the training rows held out."""
    tune = spec["tune"]
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    if unknown:
        raise ValueError(f"run {spec['name']}: unknown tune keys {unknown}; valid: {list(TUNE_KEYS)}")
    if not isinstance(tune.get("grid"), dict) or not tune["grid"]:
        raise ValueError(f"run {spec['name']}: tune.grid must map sweepable keys ({list(C.SWEEPABLE)}) to "
                         f"value lists")
    tune_protocol(spec)
    tune_score(spec)
    grid = tune["grid"] if grid is None else grid
    over = deep_update(copy.deepcopy(spec["overrides"]), tune.get("set", {}))   # e.g. tune at one epsilon
    own = dict(over.get("sweep", {}))
    clash = sorted(set(own) & set(grid))
    if clash:
        raise ValueError(f"run {spec['name']}: tune.grid and sweep both set {clash}; tune one or sweep it")
    return build_config(over, {"sweep": {**own, **grid},
                                            "seeds": tune.get("seeds", [100]),
                                            "dev_fraction": tune.get("dev_fraction", 0.15)})


def tune_score(spec):
    """The tuning score of a run's tune block (tune.score, default "dev"), checked before any compute: a
    personal score needs held-out client rows (personal_eval_fraction > 0) in the tuning pass."""
    score = spec["tune"].get("score", "dev")
    if score not in SCORES:
        raise ValueError(f"run {spec['name']}: tune.score must be one of {list(SCORES)} (got {score!r})")
    if score == "personal":
        frac = deep_update(copy.deepcopy(spec["overrides"]), spec["tune"].get("set", {})).get(
            "personal_eval_fraction", C.DEFAULTS["personal_eval_fraction"])
        if not frac:
            raise ValueError(f"run {spec['name']}: tune.score personal needs held-out client rows; set "
                             f"personal_eval_fraction (e.g. 0.1) in the run or in tune.set")
    return score


def score_table(summary, grid, score="dev"):
    """One row per grid point (grid order: the product of the keys' value lists): its mean final accuracy on
    `score` (the dev split, or "personal": each client's own model on its held-out rows) over its federations
    (tuning seeds x the run's own sweep values), None if any of them failed. The row's field is dev_accuracy
    for either score (the tuning record names the score)."""
    keys = list(grid)
    table = []
    for point in itertools.product(*[grid[k] for k in keys]):
        feds = [f for f in summary["federations"]
                if all((f.get("variant") or {}).get(k) == v for k, v in zip(keys, point))]
        ok = [f for f in feds if f.get("status") == "finished" and (f.get("final") or {}).get(score) is not None]
        mean = sum(f["final"][score] for f in ok) / len(ok) if ok and len(ok) == len(feds) else None
        table.append(dict(zip(keys, point), dev_accuracy=mean, federations=len(feds), failed=len(feds) - len(ok)))
    return table


def pick(table, tie_within=0.0):
    """(index of the chosen row, indices of the rows tied with the best). tie_within 0: the best score, equal
    scores to the first in grid order. tie_within x > 0: every row whose score is within x of the best
    (inclusive; accuracy as a fraction, 0.005 = half a point) is tied, and the median of the tied rows in grid
    order is chosen (the lower middle one of an even count): among points the dev split cannot tell apart,
    the middle one, not whichever edge the noise favoured. A row without a score is never chosen."""
    scored = [i for i, row in enumerate(table) if row["dev_accuracy"] is not None]
    if not scored:
        raise RuntimeError(f"every grid point of the tuning pass failed: {table}")
    best = max(scored, key=lambda i: table[i]["dev_accuracy"])          # max keeps the first of equal scores
    if not tie_within:
        return best, [i for i in scored if table[i]["dev_accuracy"] == table[best]["dev_accuracy"]]
    top = table[best]["dev_accuracy"]
    tied = [i for i in scored if top - table[i]["dev_accuracy"] <= tie_within + 1e-12]
    return tied[(len(tied) - 1) // 2], tied


def choose(summary, grid, tie_within=0.0, score="dev"):
    """(chosen {key: value}, table): the grid point with the best mean final accuracy on `score` over its
    federations (pick() for ties); a point with a failed federation scores None and is never chosen."""
    table = score_table(summary, grid, score)
    at, _ = pick(table, tie_within)
    return {k: table[at][k] for k in grid}, table


def edges(point, grid):
    """[(key, "min" | "max")]: the numeric grid keys whose value in point is the smallest or largest of the
    key's values (a key with fewer than 2 distinct values has no edge)."""
    out = []
    for k, v in point.items():
        vals = grid[k]
        if len(set(vals)) >= 2 and all(_is_number(x) for x in vals) and v in (min(vals), max(vals)):
            out.append((k, "min" if v == min(vals) else "max"))
    return out


def beyond(values, side):
    """The next point past the smallest (side "min") or largest ("max") of values, at the ratio of the two
    outermost values on that side (v * v / neighbour: 0.002, 0.005 -> 0.0008), or at their step
    (2v - neighbour) when any value is <= 0; 12 significant digits, an int when every value is one."""
    vs = sorted(set(values))
    v, near = (vs[0], vs[1]) if side == "min" else (vs[-1], vs[-2])
    new = float(f"{(v * v / near if vs[0] > 0 else 2 * v - near):.12g}")
    return int(new) if all(isinstance(x, int) for x in vs) and new.is_integer() else new


def _tuning_pass(cfg, out, root, profile, runner):
    """(directory, summary) of one tuning pass: a finished pass of this config anywhere under the profile's
    tuning directories is reused (another run's, e.g. every partition of a method tuned on one), a pass in
    out of this config is reused or resumed, else the pass runs in out."""
    out = find_twin(root, f"{profile}-tuning", cfg, None) or out
    done = out / "summary.json"
    if done.exists() and saved_config(out / "config.yaml") == cfg:
        summary = json.loads(done.read_text())
    else:
        summary = runner(cfg, out, progress=False)
    if not summary.get("status", "").startswith(("finished", "failed: ")):
        raise RuntimeError(f"tuning pass {out}: {summary.get('status')}")
    return out, summary


def _extension_dir(first, i, cfg):
    """<first pass>-ext<i> beside the first pass, or -ext<i>-2, -3, ... where that directory holds a pass
    of another config (two runs sharing a first pass under different tie rules)."""
    for j in itertools.count(1):
        out = first.parent / (f"{first.name}-ext{i}" + (f"-{j}" if j > 1 else ""))
        if not (out / "config.yaml").exists() or saved_config(out / "config.yaml") == cfg:
            return out


def tune_one(family, profile, spec, root, runner):
    """Run (or reuse) a run's tuning passes; returns (overrides with the chosen values set, tuning record).

    The first pass runs tune.grid. While the chosen value of a grid key is the smallest (largest) of the
    key's values run, and fewer than tune.extend points were added, one point beyond it (beyond()) runs as
    a pass of its own in <first pass>-ext<i>/ and every point run so far is scored again (pick()). Each pass
    is a run directory, so a finished pass is reused and a killed one resumes."""
    extend, tie_within = tune_protocol(spec)
    score = tune_score(spec)
    grid = {k: list(v) for k, v in spec["tune"]["grid"].items()}
    cfg = tuning_config(spec)
    passes = [_tuning_pass(cfg, Path(root) / family / f"{profile}-tuning" / spec["name"], root, profile, runner)]

    def rel(d):
        return d.relative_to(Path(root)).as_posix()
    extensions, stopped = [], None
    while True:
        table = score_table({"federations": [f for _, s in passes for f in s["federations"]]}, grid, score)
        at, tied = pick(table, tie_within)
        chosen = {k: table[at][k] for k in grid}
        at_edge = edges(chosen, grid)
        if not at_edge or len(extensions) == extend:
            break
        key, side = at_edge[0]
        value = beyond(grid[key], side)
        try:
            ext_cfg = tuning_config(spec, {**grid, key: [value]})
        except ValueError as e:                 # e.g. a step below 0 for a key that must be positive
            stopped = f"{key}={value} is not a valid value ({e})"
            break
        out, summary = _tuning_pass(ext_cfg, _extension_dir(passes[0][0], len(extensions) + 1, ext_cfg),
                                    root, profile, runner)
        passes.append((out, summary))
        grid[key] = [value] + grid[key] if side == "min" else grid[key] + [value]
        extensions.append(dict(key=key, side=side, value=value, tuning_dir=rel(out)))
    top = max(table[i]["dev_accuracy"] for i in tied)
    rule = (f"median in grid order of the {len(tied)} points within {tie_within:g} of the best ({top:.4f})"
            if tie_within else f"the best mean {score} accuracy; equal scores: the first in grid order")
    record = dict(grid=grid, grid_configured=spec["tune"]["grid"], seeds=cfg["seeds"],
                  dev_fraction=cfg["dev_fraction"], tuning_only=spec["tune"].get("set", {}),
                  score=score, split=SCORES[score], chosen=chosen, table=table,
                  tie_rule=dict(tie_within=tie_within, rule=rule,
                                tied=[{k: table[i][k] for k in grid} for i in tied]),
                  extend=extend, extensions=extensions, at_edge=[dict(key=k, side=s) for k, s in at_edge],
                  limit_reached=bool(at_edge), stopped=stopped, tuning_dir=rel(passes[0][0]))
    atomic_write_text(passes[0][0] / "tuning.json", json.dumps(record, indent=2) + "\n")
    over = copy.deepcopy(spec["overrides"])
    for k, v in chosen.items():
        section, key = k.split(".")
        over.setdefault(section, {})[key] = v
    return over, record


def run_one(family, profile, spec, root, retry_failed=False, runner=None, progress=True):
    """Run (or skip) one run, after its tuning passes if it has any; never raises for a failing run.
    Returns (status, seconds, how): how is "computed" when a tuning pass or the run itself computed anything
    (failed ones included), "copied" for a run copied from its twin in another family, else "skipped"
    (finished before, recorded failed, refused, stale)."""
    from fedsim.run import RunError, run as fedsim_run
    runner = runner or fedsim_run
    ran = []

    def counted(cfg, out, progress=False):      # a runner call that is not refused computed something
        try:
            summary = runner(cfg, out, progress=progress)
        except RunError:
            raise
        except Exception:
            ran.append(out)
            raise
        ran.append(out)
        return summary
    t0 = time.perf_counter()
    if spec.get("tune"):
        try:
            overrides, record = tune_one(family, profile, spec, root, counted)
        except RunError as e:
            print(f"  REFUSED {family}/{spec['name']} (tuning): {e}", file=sys.stderr, flush=True)
            return f"refused: tuning: {e}", time.perf_counter() - t0, "computed" if ran else "skipped"
        except Exception as e:
            print(f"  FAILED {family}/{spec['name']} (tuning): {e}", file=sys.stderr, flush=True)
            return (f"failed: tuning: {type(e).__name__}: {e}", time.perf_counter() - t0,
                    "computed" if ran else "skipped")
        spec = dict(spec, overrides=overrides,
                    tuned=dict(chosen=record["chosen"], tuning_dir=record["tuning_dir"]))
    status, copied = _run_tuned(family, profile, spec, root, retry_failed, counted, progress)
    return status, time.perf_counter() - t0, "computed" if ran else "copied" if copied else "skipped"


def _run_tuned(family, profile, spec, root, retry_failed, runner, progress):
    """(status, copied): the run of a tuned (or untuned) spec, skipped if done, copied from a twin run."""
    from fedsim.run import RunError
    out = Path(root) / family / profile / spec["name"]
    summary_path = out / "summary.json"
    meta = dict(family=family, profile=profile, name=spec["name"], labels=spec["labels"], notes=spec["notes"])
    if spec.get("tuned"):
        meta["tuned"] = spec["tuned"]
    if summary_path.exists():
        status = json.loads(summary_path.read_text()).get("status", "?")
        if (out / "config.yaml").exists() and saved_config(out / "config.yaml") != build_config(spec["overrides"]):
            return (f"stale: {out} was made with a different config (configs/ changed since); delete it to "
                    f"rerun", False)
        if status == "finished" or not retry_failed:
            return status, False
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
            return "finished", True
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
    return status, False


TWIN_FILES = ("config.yaml", "metrics.jsonl", "env.json", "final_global.pt", "partitions.csv")


def find_twin(root, profile, cfg, exclude):
    """A finished run of this profile (any family) with exactly this config, or None."""
    for cy in sorted(Path(root).glob(f"*/{profile}/*/config.yaml")):
        d = cy.parent
        if d == exclude or not (d / "summary.json").exists():
            continue
        try:
            finished = json.loads((d / "summary.json").read_text()).get("status") == "finished"
            if finished and saved_config(cy) == cfg:
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
    """(families chosen, [(family, spec)] in order, other families' required runs first, without duplicates).
    A family in only that is unknown or has no section for profile is a ValueError naming the valid ones."""
    valid = with_profile(families, profile)
    bad = [f for f in only or [] if f not in valid]
    if bad:
        why = "; ".join(f"{f!r} is not a family" if f not in families else f"{f!r} has no {profile} profile"
                        for f in bad)
        raise ValueError(f"--only: {why}; families with a {profile} profile: {', '.join(valid) or 'none'}")
    chosen = [f for f in valid if not only or f in only]
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


# ----------------------------------------------------------------------------- plan, progress, timing

def _summary(run_dir):
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _wall_s(run_dir):
    """summary.json's wall_s of a run directory, or None."""
    wall = (_summary(run_dir) or {}).get("wall_s")
    return float(wall) if _is_number(wall) else None


def _same_setting(twin, cfg, tuned_keys):
    """Whether the twin's config.yaml is this run's config, up to the tuned keys (the twin's tuning may have
    chosen other values) and the result-neutral ones: a twin of another config (more seeds, other epsilons)
    says nothing about this run's time."""
    saved = saved_config(Path(twin) / "config.yaml")
    if saved is None:
        return False
    return not C.config_diff(saved, cfg, ignore=tuple(C.RESULT_NEUTRAL) + tuple(tuned_keys))


def estimate(todo, profile, committed, root, retry_failed=False):
    """Per run of todo: (tuning passes it will run, estimated seconds or None for no estimate).

    A run already done in root (finished, or recorded failed without --retry-failed) costs 0 and runs no
    pass. Otherwise its twin, the same family, profile and run name under committed, gives the estimate: its
    summary.json wall_s (0 if it was copied from another run) plus the wall_s of its tuning passes (the first
    and each extension its tuning.json lists), a pass shared by several runs counted once. No twin, a twin
    of another config (up to the tuned keys), or a wall_s missing: None. Tuning passes without a twin: 1 for a tuned run (extensions cannot be foreseen)."""
    out, seen = [], set()
    for fam, spec in todo:
        status = (_summary(Path(root) / fam / profile / spec["name"]) or {}).get("status", "")
        if status == "finished" or (status.startswith("failed") and not retry_failed):
            out.append((0, 0.0))
            continue
        twin = Path(committed) / fam / profile / spec["name"]
        tuned_keys = set((spec.get("tune") or {}).get("grid", {}))
        if not (twin / "summary.json").exists() or not _same_setting(twin, build_config(spec["overrides"]),
                                                                     tuned_keys):
            out.append((1 if spec.get("tune") else 0, None))     # no twin, or one of another config: no guess
            continue
        try:
            meta = json.loads((twin / "run.json").read_text())
        except (OSError, ValueError):
            meta = {}
        secs = 0.0 if meta.get("copied_from") else _wall_s(twin)
        dirs = []
        if spec.get("tune"):
            first = (meta.get("tuned") or {}).get("tuning_dir")
            try:
                record = json.loads((Path(committed) / first / "tuning.json").read_text()) if first else {}
            except (OSError, ValueError):
                record = {}
            dirs = [first] + [e["tuning_dir"] for e in record.get("extensions", [])] if first else [None]
        dirs = [d for d in dirs if d not in seen]
        seen.update(d for d in dirs if d)
        for d in dirs:
            wall = _wall_s(Path(committed) / d) if d else None
            secs = None if secs is None or wall is None else secs + wall
        out.append((len(dirs), secs))
    return out


def _minutes(secs):
    """'12.3 min', or '2 h 05 min' from an hour on."""
    return f"{secs / 60:.1f} min" if secs < 3600 else f"{int(secs // 3600)} h {int(secs % 3600 // 60):02d} min"


def _cost(ests):
    """'est. 12.3 min', 'est. 12.3 min + 2 runs with no estimate' or 'no estimate' for [seconds or None]."""
    known = [e for e in ests if e is not None]
    if not known:
        return "no estimate"
    unknown = len(ests) - len(known)
    more = f" + {unknown} run{'s' * (unknown > 1)} with no estimate" if unknown else ""
    return f"est. {_minutes(sum(known))}{more}"


def print_plan(todo, ests, committed, chosen=()):
    """Each family's runs (tuning passes counted) and estimated minutes, then the total; a chosen family
    without runs of its own (a view over other families' runs) is listed with 0."""
    print(f"plan (estimates: the same runs' summary.json wall_s under {committed}, tuning passes included):",
          flush=True)
    width = max([len(fam) for fam, _ in todo] + [len(f) for f in chosen] + [5])

    def line(name, mine):
        passes = sum(p for p, _ in mine)
        print(f"  {name:<{width}}  {len(mine) + passes:3d} runs ({len(mine)} + {passes} tuning passes)  "
              + (_cost([s for _, s in mine]) if mine else "reads other families' runs"), flush=True)
    for fam in dict.fromkeys([fam for fam, _ in todo] + list(chosen)):
        line(fam, [e for (f, _), e in zip(todo, ests) if f == fam])
    line("total", ests)


def eta(ests, done):
    """(seconds left, runs left with no estimate): the estimates of the runs after the first len(done), scaled
    by measured / estimated seconds of the done runs that were computed and had a nonzero estimate (1 until
    one has). done: [(measured seconds, how)] (run_one's)."""
    pairs = [(secs, est) for (secs, how), est in zip(done, ests) if how == "computed" and est]
    scale = sum(s for s, _ in pairs) / sum(e for _, e in pairs) if pairs else 1.0
    left = ests[len(done):]
    return scale * sum(e for e in left if e is not None), sum(e is None for e in left)


def write_timing(root, family, profile, runs, started, wall_s):
    """Merge this invocation's runs of one family ({name: (status, seconds, how)}) into
    <root>/<family>/<profile>/timing.json (fields: the module docstring)."""
    path = Path(root) / family / profile / "timing.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        print(f"  {path} was unreadable: rewritten from this invocation's runs", file=sys.stderr, flush=True)
        old = {}
    merged = dict(old.get("runs", {}))
    for name, (status, secs, how) in runs.items():
        prev = merged.get(name, {})
        kept = (dict(wall_s=round(secs, 2), computed_at=started) if how == "computed" else
                dict(wall_s=prev.get("wall_s"), computed_at=prev.get("computed_at")))
        merged[name] = dict(kept, status=status, this_invocation=how, invocation_s=round(secs, 2))
    known = [r["wall_s"] for r in merged.values() if r.get("wall_s") is not None]
    record = dict(family=family, profile=profile, wall_s=round(sum(known), 2),
                  runs_without_wall_s=sorted(n for n, r in merged.items() if r.get("wall_s") is None),
                  invocation=dict(started=started, wall_s=round(wall_s, 2),
                                  computed=sum(how == "computed" for _, _, how in runs.values()),
                                  reused=sum(how != "computed" for _, _, how in runs.values())),
                  runs=dict(sorted(merged.items())))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, help="default: $PROFILE, else paper with CUDA, else quick")
    ap.add_argument("--only", nargs="+", metavar="FAMILY", help="run only these families (and the runs they read)")
    ap.add_argument("--results", help="results root (default: $FEDSIM_RESULTS or results/)")
    ap.add_argument("--configs", default=str(CONFIG_DIR), help="directory of family YAML files")
    ap.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and list the runs, run nothing")
    ap.add_argument("--no-figures", action="store_true", help="skip the figures step")
    ap.add_argument("--compare", metavar="DIR", help="at the end, compare every regenerated cell with the results "
                    "under DIR (e.g. the committed results/) -> <results>/COMPARISON.md; the plan's estimates "
                    "come from DIR too (default: results/)")
    args = ap.parse_args(argv)
    try:
        profile = detect_profile(args.profile)
        root = results_root(args.results)
        committed = Path(args.compare) if args.compare else results_root()
        if args.compare and not committed.is_dir():
            raise ValueError(f"--compare {args.compare}: no such directory; give the committed results root")
        families = load_families(args.configs)
        chosen, todo = plan(families, profile, args.only)
        for _, spec in todo:                        # every config is checked before any compute
            build_config(spec["overrides"])
            if spec.get("tune"):
                tuning_config(spec)
    except ValueError as e:
        sys.exit(f"reproduce: {e}")
    print(f"profile {profile}: {len(todo)} runs in families {chosen} -> {root}", flush=True)
    for fam in [f for f in families if not args.only and f not in chosen]:
        print(f"  {fam}: no {profile} profile (see {families[fam]['_path']})", flush=True)
    ests = estimate(todo, profile, committed, root, args.retry_failed)
    print_plan(todo, ests, committed, chosen)
    if args.dry_run:
        for fam, spec in todo:
            print(f"  {fam}/{profile}/{spec['name']}")
        return 0
    from tqdm.auto import tqdm
    progress = sys.stderr.isatty()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    last = {fam: i for i, (fam, _) in enumerate(todo)}
    t_all = time.perf_counter()
    failed, done, by_family = [], [], {}
    bar = tqdm(total=len(todo), position=0, desc=f"{profile} sweep", unit="run", disable=not progress)

    def say(line):                              # above the bars on a terminal, a plain line in a log
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def show_eta():
        left, unknown = eta([s for _, s in ests], done)
        bar.set_postfix_str(f"ETA {_minutes(left)}" + (f" + {unknown} unestimated" if unknown else ""))
    show_eta()
    try:
        for i, (fam, spec) in enumerate(todo, 1):
            status, secs, how = run_one(fam, profile, spec, root, retry_failed=args.retry_failed,
                                        progress=progress)
            done.append((secs, how))
            by_family.setdefault(fam, {})[spec["name"]] = (status, secs, how)
            write_timing(root, fam, profile, by_family[fam], started,
                         sum(s for _, s, _ in by_family[fam].values()))
            say(f"[{i}/{len(todo)}] {fam}/{spec['name']}: {status} ({secs:.0f} s)")
            if i - 1 == last[fam]:
                say(f"  {fam}: every run done; seconds in {root / fam / profile / 'timing.json'}")
            show_eta()
            bar.update(1)
            if status != "finished":
                failed.append((fam, spec["name"], status))
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: rerun the same command to resume (finished runs are skipped, a killed one resumes)",
              file=sys.stderr, flush=True)
        return 130
    finally:
        bar.close()                             # closing twice is harmless
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
