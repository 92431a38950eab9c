"""Saved runs -> pandas frames: one row per finished federation (final accuracy, bytes, epsilon) or per
evaluated round, plus the setting and provenance lines the README prints. Reads only files fedsim.run and
scripts.reproduce wrote (run.json, config.yaml, summary.json, metrics.jsonl, env.json).
"""
import json
import math
from pathlib import Path

import pandas as pd
import yaml
from scipy import stats

from scripts.verdicts import LEVEL

MB = 1e6  # bytes per MB in tables and axes


def primary_split(task):
    from fedsim.tasks import get_task
    return next(iter(get_task(task).eval_splits))


def num_labels(task):
    from fedsim.tasks import get_task
    return get_task(task).num_labels


def load_runs(root, family, profile):
    """[dict(name, dir, meta, cfg, summary, metrics, env)] of one family/profile, sorted by name."""
    base = Path(root) / family / profile
    runs = []
    if not base.is_dir():
        return runs
    for d in sorted(p for p in base.iterdir() if p.is_dir() and (p / "run.json").exists()):
        meta = json.loads((d / "run.json").read_text())
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else \
            {"status": "incomplete (no summary.json: still running or killed)", "federations": []}
        cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").exists() else None
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] \
            if (d / "metrics.jsonl").exists() else []
        env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else None
        runs.append(dict(name=d.name, dir=d, meta=meta, cfg=cfg, summary=summary, metrics=metrics, env=env))
    return runs


def variant_str(variant):
    return ",".join(f"{k}={v}" for k, v in sorted((variant or {}).items()))


def method_key(method_cfg):
    """The method a run's config names, with readings that are different methods in a table told apart:
    SA-FedLoRA's full-model initiating stage is `sa_fedlora_full`."""
    if method_cfg["name"] == "sa_fedlora" and method_cfg.get("init_stage") == "full":
        return "sa_fedlora_full"
    return method_cfg["name"]


def _labels(run):
    """The run's axis labels except those the config already says (task, method)."""
    return {k: v for k, v in run["meta"]["labels"].items() if k not in ("task", "method")}


def finished_federations(summary):
    """Federations of a run that trained to the end: all of a finished run's, the healthy ones of a run whose
    other federations diverged (fedsim.run freezes those and marks them failed), none of a crashed run."""
    status = summary.get("status", "")
    if status != "finished" and not status.endswith("federations diverged"):
        return []
    return [f for f in summary.get("federations", []) if f.get("status", "finished") == "finished"]


def status_line(run):
    """`run name`: status, then each failed federation's seed, variant and reason."""
    line = f"run `{run['name']}`: {run['summary'].get('status')}"
    for f in run["summary"].get("federations", []):
        if f.get("status") == "failed":
            line += f"; seed {f['seed']} {variant_str(f.get('variant'))}: {f['failure']['reason']}"
    return line


# dp.epsilon .inf: the DP schedule (Poisson sampling, per-sample clipping) with noise multiplier 0
CLIP_ONLY_LABEL = "σ=0 (clip only)"


def epsilon_value(epsilon):
    """A target or spent epsilon as read from summary.json: "inf" (clip only; strict JSON has no Infinity)
    -> math.inf; numbers and None unchanged."""
    return math.inf if isinstance(epsilon, str) and epsilon.strip().lower() in ("inf", "infinity") else epsilon


def privacy_label(epsilon):
    """'non-private' (None/NaN), CLIP_ONLY_LABEL (inf or "inf": sigma = 0) or 'ε=<target epsilon>'."""
    epsilon = epsilon_value(epsilon)
    if epsilon is None or (isinstance(epsilon, float) and math.isnan(epsilon)):
        return "non-private"
    return CLIP_ONLY_LABEL if math.isinf(epsilon) else f"ε={epsilon:g}"


def federation_frame(runs, privacy=False):
    """One row per (run, federation) that finished: labels, variant keys, seed, final metrics, bytes; with
    privacy=True also a `privacy` column (privacy_label of its target epsilon). A clip-only federation's
    epsilon, epsilon_spent and dp.epsilon are math.inf here ("inf" in its files)."""
    rows = []
    for r in runs:
        s, cfg = r["summary"], r["cfg"]
        if cfg is None:
            continue
        task = cfg["task"]
        for f in finished_federations(s):
            row = dict(run=r["name"], task=task, method=method_key(cfg["method"]), seed=f["seed"],
                       variant=variant_str(f.get("variant")),
                       commit=str((r.get("env") or {}).get("git_commit"))[:12],
                       **_labels(r))
            for k, v in (f.get("variant") or {}).items():
                row[k] = epsilon_value(v) if k == "dp.epsilon" else v
            row["acc"] = f["final"].get(primary_split(task), float("nan"))
            for k, v in f["final"].items():
                row[f"acc_{k}"] = v
            row["personal_majority"] = f.get("personal_majority", float("nan"))   # each client's own majority label
            row["cum_up_MB"] = f["cum_up_bytes"] / MB
            row["epsilon"] = epsilon_value(f.get("target_epsilon"))          # clip only: math.inf
            row["epsilon_spent"] = epsilon_value(f.get("epsilon_spent"))
            row["chance"] = 1.0 / num_labels(task)
            row["lora_rank"] = int(cfg["lora"]["rank"])
            row["lora.alpha"] = float((f.get("variant") or {}).get("lora.alpha", cfg["lora"]["alpha"]))
            for k, v in cfg["method"].items():
                if k != "name":
                    row[f"method.{k}"] = v
            rows.append(row)
    df = pd.DataFrame(rows)
    if privacy and len(df):
        df["privacy"] = [privacy_label(e) for e in df["epsilon"]]
    return df


def curve_frame(runs):
    """One row per (run, federation, evaluated round): accuracy and cumulative upload. A run whose evaluations
    before the last scored a subset of the split (curve_eval_subsample) gives that subset's accuracy at every
    round, the last included, so each curve compares the same rows; its final tables read the whole split."""
    rows = []
    for r in runs:
        if r["cfg"] is None:
            continue
        split = primary_split(r["cfg"]["task"]) + ("_curve" if r["cfg"].get("curve_eval_subsample") else "")
        healthy = {f["federation"] for f in finished_federations(r["summary"])}
        for m in r["metrics"]:
            if f"acc_{split}" not in m or m["federation"] not in healthy:
                continue
            rows.append(dict(run=r["name"], task=r["cfg"]["task"], method=method_key(r["cfg"]["method"]),
                             federation=m["federation"], seed=m["seed"], variant=variant_str(m.get("variant")),
                             round=m["round"], acc=m[f"acc_{split}"], cum_up_MB=m["cum_up_bytes"] / MB,
                             **_labels(r)))
    return pd.DataFrame(rows)


def last_point(curves):
    """Each (run, federation)'s accuracy at its last evaluated round in a curve_frame: the final accuracy on the
    rows its curve scores (a fixed subset under curve_eval_subsample), so a target taken from it is crossed
    on the same rows as the curves it is read from."""
    if curves.empty:
        return curves
    last = curves.sort_values("round").groupby(["run", "federation"], sort=True).tail(1)
    return last.sort_values(["run", "federation"]).reset_index(drop=True)


def ci_half(std, n, level=LEVEL):
    """Half-width of the two-sided t-interval (level, 95%) of a mean of n values with sample std `std`;
    nan for a single value (no interval)."""
    n = int(n)
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan


def agg(df, by, col="acc"):
    """mean, std (sample, ddof=1; 0 for one seed), n and ci (95% t-interval half-width; nan for one seed) over
    seeds for each group of `by`."""
    g = df.groupby(by, sort=False, dropna=False)[col]
    out = g.agg(["mean", "std", "count"]).rename(columns={"count": "n"}).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["ci"] = [ci_half(s, n) for s, n in zip(out["std"], out["n"])]
    if {"run", "seed", "commit"} <= set(df.columns):      # where each number came from, for the csv
        src = df.groupby(by, sort=False, dropna=False).apply(lambda d: pd.Series({
            "per_seed": ";".join(f"{int(s)}:{v:.6g}" for s, v in sorted(zip(d["seed"], d[col]))),
            "runs": ";".join(sorted({str(x) for x in d["run"].dropna()})),
            "commits": ";".join(sorted({str(x) for x in d["commit"].dropna()}))}),
            include_groups=False).reset_index()
        out = out.merge(src, on=by, how="left")
    return out


def sources(c):
    """The csv fields that say where an aggregated cell came from: its 95% half-width, per-seed values
    ("seed:value;..."), run directories and commits (present when the frame had run, seed and commit)."""
    return {k: c[k] for k in ("ci", "per_seed", "runs", "commits") if k in c}


def setting_line(runs):
    """Config values shared by every finished run of a family, as one line (what the numbers are)."""
    cfgs = [r["cfg"] for r in runs if r["cfg"]]
    if not cfgs:
        return ""
    keys = ["model", "num_hidden_layers", "max_length", "train_subsample", "eval_subsample", "num_clients",
            "client_fraction", "rounds", "local_steps", "batch_size", "seeds"]
    parts = []
    for k in keys:
        vals = sorted({json.dumps(c.get(k)) for c in cfgs})
        parts.append(f"{k}={json.loads(vals[0]) if len(vals) == 1 else '/'.join(vals)}")
    parts.append("partition=" + "/".join(sorted({json.dumps(c['partition'], sort_keys=True) for c in cfgs})))
    parts.append("optimizer=" + "/".join(sorted({f"{c['optimizer']['name']}(lr={c['optimizer']['lr']})"
                                                   for c in cfgs})))
    return "; ".join(parts)


def provenance(runs):
    """Distinct (commit, device, versions) lines over the runs' env.json files."""
    lines = set()
    for r in runs:
        e = r["env"]
        if not e:
            continue
        libs = e.get("libraries", {})
        lines.add(f"git {str(e.get('git_commit'))[:12]}{' (dirty)' if e.get('git_dirty') else ''}, "
                  f"{e.get('device')} ({e.get('device_name')}, {e.get('cpu_count')} CPUs), python {e.get('python')}, "
                  f"torch {libs.get('torch')}, transformers {libs.get('transformers')}, peft {libs.get('peft')}")
    return sorted(lines)


def per_seed(df, **where):
    """{seed: accuracy} of the finished federations matching `where` (column == value)."""
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    return dict(zip(sel["seed"].astype(int), sel["acc"].astype(float)))
