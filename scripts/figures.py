"""Tables, figures and results/README.md from saved runs only (no training).

    python -m scripts.figures [--profile quick|paper|smoke] [--results DIR]

Reads <results>/<family>/<profile>/<run>/{run.json, config.yaml, summary.json, metrics.jsonl, env.json,
partitions.csv} and writes, per family, into <results>/<family>/<profile>/:
  tables/<name>.md|.csv|.tex   mean +- std over seeds (federations); a marker where a difference between
                               methods is smaller than the seed spread
  figures/<name>.png|.pdf      labeled axes and units (bytes as MB), legends, error bars = 1 std over seeds
partition heatmaps into <results>/partitions/<profile>/, and <results>/README.md: every table and figure,
the profile and device that produced it (from env.json), and each seed-paper claim beside our outcome.

Outputs are deterministic: no timestamps (except those copied from env.json), sorted inputs, fixed float
formatting, and matplotlib metadata stripped (Software/CreationDate), so rerunning gives identical bytes.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("SOURCE_DATE_EPOCH", "0")          # reproducible PDF bytes

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROFILES = ("smoke", "quick", "paper")
FAMILY_ORDER = ("ffa_table", "dp_recipe", "heterogeneity", "alpha", "rank", "slora", "communication")
PNG_META = {"Software": None}
PDF_META = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
METHOD_LABEL = {"fedavg_fft": "FedAvg-FFT", "fedavg_lora": "FedAvg-LoRA", "ffa_lora": "FFA-LoRA",
                "slora": "SLoRA", "sa_fedlora": "SA-FedLoRA"}
METHOD_ORDER = ["fedavg_fft", "fedavg_lora", "ffa_lora", "slora", "sa_fedlora"]
PEFT_METHOD = "fedavg_lora"       # the PEFT side of the SLoRA paper's gap claim (plain LoRA; SLoRA is its fix)
MB = 1e6
# How "comparable" and "same" are judged (also printed in the README):
COMPARABLE_TOL = 0.02      # accuracy points (fraction) below which two methods count as comparable ...
SPREAD = "max"             # ... or within the larger of the two seed standard deviations, whichever is larger

plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.grid": True,
                     "grid.alpha": 0.3, "legend.fontsize": 8, "path.simplify": False})


# ============================================================================= loading

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


def _variant_str(variant):
    return ",".join(f"{k}={v}" for k, v in sorted((variant or {}).items()))


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


def _status_line(run):
    """`run name`: status, then each failed federation's seed, variant and reason."""
    line = f"run `{run['name']}`: {run['summary'].get('status')}"
    for f in run["summary"].get("federations", []):
        if f.get("status") == "failed":
            line += f"; seed {f['seed']} {_variant_str(f.get('variant'))}: {f['failure']['reason']}"
    return line


def federation_frame(runs):
    """One row per (run, federation) that finished: labels, variant keys, seed, final metrics, bytes."""
    rows = []
    for r in runs:
        s, cfg = r["summary"], r["cfg"]
        if cfg is None:
            continue
        task = cfg["task"]
        for f in finished_federations(s):
            row = dict(run=r["name"], task=task, method=cfg["method"]["name"], seed=f["seed"],
                       variant=_variant_str(f.get("variant")), **_labels(r))
            for k, v in (f.get("variant") or {}).items():
                row[k] = v
            row["acc"] = f["final"].get(primary_split(task), float("nan"))
            for k, v in f["final"].items():
                row[f"acc_{k}"] = v
            row["cum_up_MB"] = f["cum_up_bytes"] / MB
            row["epsilon"] = f.get("target_epsilon")
            row["epsilon_spent"] = f.get("epsilon_spent")
            row["chance"] = 1.0 / num_labels(task)
            row["lora_rank"] = int(cfg["lora"]["rank"])
            row["lora.alpha"] = float((f.get("variant") or {}).get("lora.alpha", cfg["lora"]["alpha"]))
            for k, v in cfg["method"].items():
                if k != "name":
                    row[f"method.{k}"] = v
            rows.append(row)
    return pd.DataFrame(rows)


def curve_frame(runs):
    """One row per (run, federation, evaluated round): accuracy and cumulative upload."""
    rows = []
    for r in runs:
        if r["cfg"] is None:
            continue
        split = primary_split(r["cfg"]["task"])
        healthy = {f["federation"] for f in finished_federations(r["summary"])}
        for m in r["metrics"]:
            if f"acc_{split}" not in m or m["federation"] not in healthy:
                continue
            rows.append(dict(run=r["name"], task=r["cfg"]["task"], method=r["cfg"]["method"]["name"],
                             federation=m["federation"], seed=m["seed"], variant=_variant_str(m.get("variant")),
                             round=m["round"], acc=m[f"acc_{split}"], cum_up_MB=m["cum_up_bytes"] / MB,
                             **_labels(r)))
    return pd.DataFrame(rows)


# ============================================================================= statistics and formatting

def agg(df, by, col="acc"):
    """mean, std (sample, ddof=1; 0 for one seed), n over seeds for each group of `by`."""
    g = df.groupby(by, sort=False, dropna=False)[col]
    out = g.agg(["mean", "std", "count"]).rename(columns={"count": "n"}).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def fmt_pct(mean, std, n=None):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def tol(std_a, std_b):
    return max(COMPARABLE_TOL, std_a, std_b)


def within_spread(mean_a, std_a, mean_b, std_b):
    """The difference is smaller than the seed spread (the larger of the two std)."""
    return abs(mean_a - mean_b) < max(std_a, std_b)


def markdown(df, index=True):
    """Pipe table without the tabulate dependency; cells as already formatted strings."""
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    for row in d.itertuples(index=False):
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


def _tex_escape(s):
    s = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        s = s.replace(a, b)
    return s.replace("±", r"$\pm$").replace("≈", r"$\approx$").replace("ε", r"$\varepsilon$") \
        .replace("α", r"$\alpha$").replace("†", r"$^\dagger$").replace("Δ", r"$\Delta$")


def latex(df, caption, index=True):
    d = df.reset_index() if index else df.copy()
    d.columns = [_tex_escape(c) for c in d.columns]
    d = d.map(_tex_escape)
    return d.to_latex(index=False, escape=False, caption=_tex_escape(caption), column_format="l" + "r" * (d.shape[1] - 1))


class Writer:
    """Collects every table and figure of one family (for the README) and writes them deterministically."""

    def __init__(self, root, family, profile):
        self.root, self.family, self.profile = Path(root), family, profile
        self.out = self.root / family / profile
        self.items = []            # (kind, name, caption, paths, markdown text)

    def table(self, name, display, raw, caption):
        """display: formatted DataFrame (md/tex); raw: numeric DataFrame (csv)."""
        d = self.out / "tables"
        d.mkdir(parents=True, exist_ok=True)
        md = markdown(display)
        (d / f"{name}.md").write_text(f"<!-- {caption} -->\n" + md)
        raw.to_csv(d / f"{name}.csv", index=False, float_format="%.6g", lineterminator="\n")
        (d / f"{name}.tex").write_text(latex(display, caption))
        self.items.append(("table", name, caption, [d / f"{name}.{e}" for e in ("md", "csv", "tex")], md))

    def figure(self, name, fig, caption):
        d = self.out / "figures"
        d.mkdir(parents=True, exist_ok=True)
        fig.savefig(d / f"{name}.png", metadata=PNG_META)
        fig.savefig(d / f"{name}.pdf", metadata=PDF_META)
        plt.close(fig)
        self.items.append(("figure", name, caption, [d / f"{name}.png", d / f"{name}.pdf"], None))


def _clean(out_dir):
    for sub in ("tables", "figures"):
        if (out_dir / sub).is_dir():
            shutil.rmtree(out_dir / sub)


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


def _errorbar(ax, x, mean, std, label, **kw):
    ax.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, lw=1.2, label=label, **kw)


def _methods(df):
    present = list(dict.fromkeys(df["method"])) if len(df) else []
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


def learned(mean, chance):
    return mean > chance + 0.05


# ============================================================================= families

def privacy_label(row):
    eps = row.get("epsilon")
    return "non-private" if eps is None or (isinstance(eps, float) and math.isnan(eps)) else f"ε={eps:g}"


def _privacy_order(levels):
    def key(s):
        return (0, 0) if s == "non-private" else (1, -float(s.split("=")[1]))
    return sorted(set(levels), key=key)


def family_ffa_table(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return
    df["privacy"] = [privacy_label(r) for r in df.to_dict("records")]
    a = agg(df, ["task", "method", "privacy"])
    a["chance"] = [1.0 / num_labels(t) for t in a["task"]]
    levels = _privacy_order(a["privacy"])
    disp_rows, raw = [], []
    for task in sorted(a["task"].unique()):
        for method in _methods(a[a.task == task]):
            row = {"task": task, "method": METHOD_LABEL.get(method, method)}
            for lev in levels:
                c = a[(a.task == task) & (a.method == method) & (a.privacy == lev)]
                if c.empty:
                    row[lev] = "-"
                    continue
                c = c.iloc[0]
                mark = "" if learned(c["mean"], c["chance"]) else " (chance)"
                row[lev] = fmt_pct(c["mean"], c["std"]) + mark
                raw.append(dict(task=task, method=method, privacy=lev, mean=c["mean"], std=c["std"], n=c["n"]))
            disp_rows.append(row)
    disp = pd.DataFrame(disp_rows).set_index(["task", "method"])
    w.table("accuracy", disp, pd.DataFrame(raw),
            "Final accuracy (%) of the global model, mean ± std over seeds, by privacy level (δ=1e-5).")
    # FFA - FedAvg per task and level, flagged when within the seed spread
    diff_rows, diff_raw = [], []
    for task in sorted(a["task"].unique()):
        row = {"task": task}
        for lev in levels:
            f = a[(a.task == task) & (a.method == "ffa_lora") & (a.privacy == lev)]
            g = a[(a.task == task) & (a.method == "fedavg_lora") & (a.privacy == lev)]
            if f.empty or g.empty:
                row[lev] = "-"
                continue
            f, g = f.iloc[0], g.iloc[0]
            d = f["mean"] - g["mean"]
            flag = within_spread(f["mean"], f["std"], g["mean"], g["std"])
            row[lev] = f"{100 * d:+.1f}" + (" ≈" if flag else "")
            diff_raw.append(dict(task=task, privacy=lev, ffa_minus_fedavg=d, spread=max(f["std"], g["std"]),
                                 within_spread=flag))
        diff_rows.append(row)
    w.table("ffa_minus_fedavg", pd.DataFrame(diff_rows).set_index("task"), pd.DataFrame(diff_raw),
            "FFA-LoRA minus FedAvg-LoRA accuracy (points); ≈ = smaller than the seed spread (larger std).")
    tasks = sorted(a["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in _methods(a[a.task == task]):
            c = a[(a.task == task) & (a.method == method)].set_index("privacy").reindex(levels)
            _errorbar(ax, range(len(levels)), 100 * c["mean"], 100 * c["std"], METHOD_LABEL.get(method, method))
        ax.axhline(100 / num_labels(task), color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(levels)), levels)
        ax.set_xlabel("privacy level (δ=1e-5)")
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
        ax.set_title(task)
        ax.legend()
    fig.tight_layout()
    w.figure("accuracy_vs_privacy", fig, "Accuracy vs privacy level; error bars = 1 std over seeds.")
    ctx["ffa_table"] = a
    ctx["ffa_table_seeds"] = df


RECIPE_REFERENCE = "adamw_joint (FFA table)"


def family_dp_recipe(w, runs, ctx):
    """Private accuracy by method and DP recipe at the family's ε, beside the FFA table's recipe (AdamW, joint
    clipping) at the same ε and seeds; FFA − FedAvg per recipe, paired by seed (scripts/verdicts.py)."""
    df = federation_frame(runs)
    if df.empty:
        return
    frames, ref = [df], ctx.get("ffa_table_seeds")
    if ref is not None and len(ref):
        same = ref[ref.task.isin(df.task.unique()) & ref.epsilon.isin(df.epsilon.unique())]
        frames.insert(0, same.assign(recipe=RECIPE_REFERENCE))
    both = pd.concat(frames, ignore_index=True)
    a = agg(both, ["task", "method", "recipe"])
    recipes = list(dict.fromkeys(both["recipe"]))
    eps = ", ".join(f"ε={e:g}" for e in sorted(df.epsilon.unique()))
    rows, raw, diffs = [], [], []
    for task in sorted(a.task.unique()):
        chance = 1.0 / num_labels(task)
        for method in _methods(a[a.task == task]):
            row = {"task": task, "method": METHOD_LABEL.get(method, method)}
            for rec in recipes:
                c = a[(a.task == task) & (a.method == method) & (a.recipe == rec)]
                if c.empty:
                    row[rec] = "-"
                    continue
                c = c.iloc[0]
                row[rec] = fmt_pct(c["mean"], c["std"]) + ("" if learned(c["mean"], chance) else " (chance)")
                raw.append(dict(task=task, method=method, recipe=rec, mean=c["mean"], std=c["std"], n=c["n"]))
            rows.append(row)
        for rec in recipes:
            seeds = [_per_seed(both, task=task, method=m, recipe=rec) for m in ("ffa_lora", "fedavg_lora")]
            if all(seeds):
                v = paired_verdict(*seeds)
                dead = not learned(max(np.mean(list(x.values())) for x in seeds), chance)
                diffs.append(dict(task=task, recipe=rec, mean=v.mean, low=v.low, high=v.high, n=v.n,
                                  verdict="inconclusive (both at chance)" if dead else v.verdict,
                                  text=f"Δ {100 * v.mean:+.1f} points: no verdict, both at chance" if dead else v.text()))
    w.table("accuracy", pd.DataFrame(rows).set_index(["task", "method"]), pd.DataFrame(raw),
            f"Final accuracy (%) at {eps} (δ=1e-5) by DP recipe, mean ± std over seeds; the first column is the "
            f"FFA table's cells at the same ε.")
    if diffs:
        d = pd.DataFrame(diffs)
        w.table("ffa_minus_fedavg", d[["task", "recipe", "text"]].rename(columns={"text": "FFA − FedAvg"})
                .set_index(["task", "recipe"]), d.drop(columns="text"),
                "FFA-LoRA minus FedAvg-LoRA by recipe, paired by seed: does the FFA table's verdict depend on "
                "the recipe?")


def _partition_key(label):
    """Order partitions from IID (least skew) to the smallest Dirichlet alpha."""
    if label == "iid":
        return (0, 0.0)
    try:
        return (1, -float(label.lstrip("dira")))
    except ValueError:
        return (2, 0.0)


def _partition_name(label):
    return "IID" if label == "iid" else f"α={label.lstrip('dira')}" if label.startswith(("dir", "a")) else label


def family_heterogeneity(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return
    a = agg(df, ["task", "method", "partition"])
    for task in sorted(a["task"].unique()):
        at = a[a.task == task]
        parts = sorted(at["partition"].unique(), key=_partition_key)     # each task its own skew levels
        names = [_partition_name(p) for p in parts]
        chance = 1.0 / num_labels(task)
        disp_rows, raw = [], []
        best = {p: at[at.partition == p].sort_values("mean", ascending=False).iloc[0] for p in parts
                if not at[at.partition == p].empty}
        for method in _methods(at):
            row = {"method": METHOD_LABEL.get(method, method)}
            for p, nm in zip(parts, names):
                c = at[(at.method == method) & (at.partition == p)]
                if c.empty:
                    row[nm] = "-"
                    continue
                c = c.iloc[0]
                b = best[p]
                tie = c["method"] != b["method"] and within_spread(c["mean"], c["std"], b["mean"], b["std"])
                row[nm] = fmt_pct(c["mean"], c["std"]) + (" †" if tie or c["method"] == b["method"] else "") + \
                    ("" if learned(c["mean"], chance) else " (chance)")
                raw.append(dict(task=task, method=method, partition=p, mean=c["mean"], std=c["std"], n=c["n"],
                                best_or_within_spread_of_best=bool(tie or c["method"] == b["method"])))
            disp_rows.append(row)
        w.table(f"accuracy_{task}", pd.DataFrame(disp_rows).set_index("method"), pd.DataFrame(raw),
                f"{task}: final accuracy (%) by label skew (Dirichlet α; IID = no skew), mean ± std over seeds; "
                f"† = best in its column or within the seed spread of the best.")
        gap_rows = []      # SLoRA's motivating claim: the gap of PEFT (LoRA) to full fine-tuning widens with skew
        for p, nm in zip(parts, names):
            f = at[(at.method == "fedavg_fft") & (at.partition == p)]
            s = at[(at.method == PEFT_METHOD) & (at.partition == p)]
            if f.empty or s.empty:
                continue
            f, s = f.iloc[0], s.iloc[0]
            gap_rows.append(dict(partition=nm, key=p, gap=f["mean"] - s["mean"], spread=max(f["std"], s["std"]),
                                 within_spread=within_spread(f["mean"], f["std"], s["mean"], s["std"]),
                                 fft_learned=learned(f["mean"], chance)))
        if gap_rows:
            g = pd.DataFrame(gap_rows)
            disp = pd.DataFrame({"partition": g["partition"],
                                 "FFT − LoRA (points)": [f"{100 * x:+.1f}" + (" ≈" if fl else "")
                                                          for x, fl in zip(g["gap"], g["within_spread"])],
                                 "seed spread": [f"{100 * x:.1f}" for x in g["spread"]]}).set_index("partition")
            w.table(f"peft_gap_{task}", disp, g.drop(columns="key"),
                    f"{task}: accuracy gap FedAvg-FFT minus FedAvg-LoRA by label skew; ≈ = within the seed spread.")
            ctx.setdefault("peft_gap", {})[task] = g
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for method in _methods(at):
            c = at[at.method == method].set_index("partition").reindex(parts)
            _errorbar(ax, range(len(parts)), 100 * c["mean"], 100 * c["std"], METHOD_LABEL.get(method, method))
        ax.axhline(100 * chance, color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(parts)), names)
        ax.set_xlabel("label skew (Dirichlet α, smaller = more heterogeneous)")
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
        ax.set_title(f"{task}: accuracy vs heterogeneity")
        ax.legend(ncol=2)
        fig.tight_layout()
        w.figure(f"accuracy_vs_alpha_{task}", fig, f"{task}: accuracy vs Dirichlet α (error bars: 1 std over seeds).")
    ctx["heterogeneity"] = a
    ctx["heterogeneity_seeds"] = df


def _accuracy_panels(axes, groups, key, xs, xlabel):
    """One panel per (task, privacy) group: accuracy of each method vs `key` over xs (log2 axis)."""
    for ax, ((task, priv), at) in zip(axes, groups):
        for method in _methods(at):
            c = at[at.method == method].set_index(key).reindex(xs)
            _errorbar(ax, xs, 100 * c["mean"], 100 * c["std"], METHOD_LABEL.get(method, method))
        ax.axhline(100 / num_labels(task), color="grey", ls=":", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
        ax.set_title(f"{task}, {priv}")
        ax.legend()


def family_alpha(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return
    df["privacy"] = [privacy_label(r) for r in df.to_dict("records")]
    a = agg(df, ["task", "privacy", "method", "lora.alpha"])
    alphas = sorted(a["lora.alpha"].unique())
    disp_rows, raw, ranges = [], [], []
    for (task, priv), at in a.groupby(["task", "privacy"], sort=True):
        for method in _methods(at):
            c = at[at.method == method].set_index("lora.alpha").reindex(alphas)
            row = {"task": task, "privacy": priv, "method": METHOD_LABEL.get(method, method)}
            for al in alphas:
                row[f"α={al:g}"] = fmt_pct(c.loc[al, "mean"], c.loc[al, "std"])
                raw.append(dict(task=task, privacy=priv, method=method, lora_alpha=al, mean=c.loc[al, "mean"],
                                std=c.loc[al, "std"], n=c.loc[al, "n"]))
            rng = c["mean"].max() - c["mean"].min()
            row["range (max−min)"] = f"{100 * rng:.1f}"
            ranges.append(dict(task=task, privacy=priv, method=method, range=rng, mean_std=c["std"].mean(),
                               learned_cells=int(sum(learned(m, 1.0 / num_labels(task)) for m in c["mean"])),
                               cells=len(alphas)))
            disp_rows.append(row)
    w.table("accuracy", pd.DataFrame(disp_rows).set_index(["task", "privacy", "method"]), pd.DataFrame(raw),
            "Final accuracy (%) vs LoRA scaling α (scale α/r), mean ± std over seeds; range = max − min of the means.")
    groups = list(a.groupby(["task", "privacy"], sort=True))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.8 * len(groups), 3.1), squeeze=False)
    _accuracy_panels(axes[0], groups, "lora.alpha", alphas, "LoRA α (scale = α / r)")
    fig.tight_layout()
    w.figure("accuracy_vs_lora_alpha", fig, "Accuracy vs LoRA α, with and without DP (error bars: 1 std over seeds).")
    ctx["alpha_ranges"] = pd.DataFrame(ranges)


def family_rank(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return
    df["privacy"] = [privacy_label(r) for r in df.to_dict("records")]
    df["rank"] = df["lora_rank"]
    rounds = {r["name"]: r["cfg"]["rounds"] for r in runs if r["cfg"]}
    df["up_MB_per_round"] = [m / rounds[n] for m, n in zip(df["cum_up_MB"], df["run"])]
    a = agg(df, ["task", "privacy", "method", "rank"])
    mb = agg(df, ["task", "privacy", "method", "rank"], "up_MB_per_round")
    ranks = sorted(a["rank"].unique())
    disp_rows, raw = [], []
    for (task, priv), at in a.groupby(["task", "privacy"], sort=True):
        for method in _methods(at):
            row = {"task": task, "privacy": priv, "method": METHOD_LABEL.get(method, method)}
            for r_ in ranks:
                c = at[(at.method == method) & (at["rank"] == r_)]
                row[f"r={r_}"] = fmt_pct(c["mean"].iloc[0], c["std"].iloc[0]) if len(c) else "-"
                if len(c):
                    up = mb[(mb.task == task) & (mb.privacy == priv) & (mb.method == method) & (mb["rank"] == r_)]
                    raw.append(dict(task=task, privacy=priv, method=method, rank=r_, mean=c["mean"].iloc[0],
                                    std=c["std"].iloc[0], n=c["n"].iloc[0], up_MB_per_round=up["mean"].iloc[0]))
            disp_rows.append(row)
    w.table("accuracy", pd.DataFrame(disp_rows).set_index(["task", "privacy", "method"]), pd.DataFrame(raw),
            "Final accuracy (%) vs LoRA rank r, mean ± std over seeds (upload MB per round in the CSV).")
    groups = list(a.groupby(["task", "privacy"], sort=True))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(3.8 * (len(groups) + 1), 3.1), squeeze=False)
    _accuracy_panels(axes[0], groups, "rank", ranks, "LoRA rank r")
    ax = axes[0][-1]
    for method in _methods(mb):
        c = mb[mb.method == method].groupby("rank")["mean"].mean()
        ax.plot(c.index, c.values, marker="o", ms=4, label=METHOD_LABEL.get(method, method))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("upload per round, all sampled clients (MB)")
    ax.set_title("communication per round")
    ax.legend()
    fig.tight_layout()
    w.figure("accuracy_vs_rank", fig, "Accuracy and upload per round vs LoRA rank (error bars: 1 std over seeds).")


def _reference(root, profile, runs, family="heterogeneity", labels_of=None):
    """Reference federations (e.g. FedAvg-FFT) from another family, kept only where the setting is the same."""
    ref = load_runs(root, family, profile)
    mine = [r["cfg"] for r in runs if r["cfg"]]
    if not mine:
        return pd.DataFrame()
    keys = ["task", "model", "num_hidden_layers", "max_length", "train_subsample", "eval_subsample", "num_clients",
            "client_fraction", "partition", "rounds", "local_steps", "batch_size", "seeds", "dp"]
    want = {json.dumps({k: mine[0].get(k) for k in keys}, sort_keys=True)}
    keep = [r for r in ref if r["cfg"] and json.dumps({k: r["cfg"].get(k) for k in keys}, sort_keys=True) in want]
    return federation_frame(keep)


def family_slora(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return
    from methods.slora import SLoRAParams
    d0 = SLoRAParams()
    for col, default in (("density", d0.density), ("stage1_rounds", d0.stage1_rounds)):
        df[col] = df[f"method.{col}"].fillna(default) if f"method.{col}" in df else default
    # the density sweep holds stage-1 length at its most common value and vice versa
    def most_common(col, prefer):
        counts = df[col].value_counts()
        top = sorted(v for v, c in counts.items() if c == counts.max())
        return min(top, key=lambda v: abs(v - prefer))
    fixed = {"density": most_common("stage1_rounds", df["stage1_rounds"].median()),
             "stage1_rounds": most_common("density", 0.01)}
    ref = _reference(ctx["root"], ctx["profile"], runs)
    refa = agg(ref, ["method"]) if not ref.empty else pd.DataFrame(columns=["method", "mean", "std", "n"])
    refa = refa[refa.method.isin(["fedavg_fft", "fedavg_lora"])]
    task = df["task"].iloc[0]
    chance = 1.0 / num_labels(task)
    fft = refa[refa.method == "fedavg_fft"]
    fft = fft.iloc[0] if len(fft) else None
    tables = {}
    for axis in ("density", "stage1_rounds"):
        other = "stage1_rounds" if axis == "density" else "density"
        sub = df[df[other] == fixed[axis]]
        a = agg(sub, [axis]).sort_values(axis)
        rows, raw = [], []
        for _, c in a.iterrows():
            row = {axis: f"{c[axis]:g}", "SLoRA accuracy (%)": fmt_pct(c["mean"], c["std"]) +
                   ("" if learned(c["mean"], chance) else " (chance)")}
            if fft is not None:
                d = c["mean"] - fft["mean"]
                row["Δ vs FedAvg-FFT (points)"] = f"{100 * d:+.1f}" + (
                    " ≈" if within_spread(c["mean"], c["std"], fft["mean"], fft["std"]) else "")
            rows.append(row)
            raw.append(dict(axis=axis, value=c[axis], mean=c["mean"], std=c["std"], n=c["n"],
                            fft_mean=None if fft is None else fft["mean"], fft_std=None if fft is None else fft["std"]))
        for _, rr in refa.iterrows():
            rows.append({axis: f"ref: {METHOD_LABEL[rr['method']]}", "SLoRA accuracy (%)": fmt_pct(rr["mean"], rr["std"]),
                         **({"Δ vs FedAvg-FFT (points)": ""} if fft is not None else {})})
        tables[axis] = a
        w.table(f"{axis}", pd.DataFrame(rows).set_index(axis), pd.DataFrame(raw),
                f"{task}: SLoRA accuracy vs {axis.replace('_', ' ')} ({other.replace('_', ' ')} {fixed[axis]:g}), "
                f"mean ± std over seeds; references from the heterogeneity family at the same setting; "
                f"≈ = difference within the seed spread.")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.1))
    for ax, axis, xl in zip(axes, ("density", "stage1_rounds"), ("stage-1 density (fraction of entries)",
                                                                  "stage-1 length (rounds)")):
        a = tables[axis]
        _errorbar(ax, a[axis], 100 * a["mean"], 100 * a["std"], "SLoRA")
        for _, rr in refa.iterrows():
            ax.axhspan(100 * (rr["mean"] - rr["std"]), 100 * (rr["mean"] + rr["std"]), alpha=0.15,
                       color="C1" if rr["method"] == "fedavg_fft" else "C2")
            ax.axhline(100 * rr["mean"], color="C1" if rr["method"] == "fedavg_fft" else "C2", lw=1,
                       label=METHOD_LABEL[rr["method"]])
        ax.axhline(100 * chance, color="grey", ls=":", lw=1, label="chance")
        if axis == "density":
            ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
        ax.legend()
    fig.suptitle(f"SLoRA on {task}")
    fig.tight_layout()
    w.figure("slora_density_stage1", fig, "SLoRA accuracy vs stage-1 density and length; bands = reference ± 1 std.")
    ctx["slora"] = dict(density=tables["density"], fft=fft, chance=chance)


def bytes_to_target(curves, target):
    """Per federation: cumulative MB uploaded when accuracy first reaches target (NaN if never)."""
    out = []
    for (run, fed), c in curves.groupby(["run", "federation"], sort=True):
        c = c.sort_values("round")
        hit = c[c["acc"] >= target]
        out.append(dict(run=run, federation=fed, method=c["method"].iloc[0],
                        MB=hit["cum_up_MB"].iloc[0] if len(hit) else float("nan")))
    return pd.DataFrame(out)


def family_communication(w, runs, ctx, prof):
    """A view over another family's runs (prof['runs_from']): accuracy vs uploaded bytes per method."""
    src = prof["runs_from"]
    where = src.get("where", {})
    runs = [r for r in load_runs(ctx["root"], src["family"], ctx["profile"])
            if all(r["meta"]["labels"].get(k) in [str(x) for x in (v if isinstance(v, list) else [v])]
                   for k, v in where.items())]
    df, cv = federation_frame(runs), curve_frame(runs)
    if df.empty:
        return []
    frac = float(prof.get("target_fraction_of_fft", 0.9))
    rows_all, raw_all = [], []
    for task in sorted(df["task"].unique()):
        dt, ct = df[df.task == task], cv[cv.task == task]
        part_labels = sorted(dt["partition"].unique(), key=_partition_key) if "partition" in dt else [None]
        for part in part_labels:
            dp_, cp = (dt[dt.partition == part], ct[ct.partition == part]) if part else (dt, ct)
            a = agg(dp_, ["method"])
            mbf = agg(dp_, ["method"], "cum_up_MB")
            fft = a[a.method == "fedavg_fft"]
            ref = fft.iloc[0]["mean"] if len(fft) else a["mean"].max()
            target = frac * ref
            bt = bytes_to_target(cp, target)
            fft_mb = bt[bt.method == "fedavg_fft"]["MB"].mean() if len(fft) else float("nan")
            fft_total = mbf[mbf.method == "fedavg_fft"]["mean"].iloc[0] if len(fft) else float("nan")
            pname = _partition_name(part) if part else ""
            for method in _methods(a):
                c = a[a.method == method].iloc[0]
                b = bt[bt.method == method]["MB"]
                reached = int(b.notna().sum())
                mb_t = b.mean() if reached == len(b) and len(b) else float("nan")
                total = mbf[mbf.method == method]["mean"].iloc[0]
                red_t = 1 - mb_t / fft_mb if fft_mb == fft_mb and mb_t == mb_t else float("nan")
                red_total = 1 - total / fft_total if fft_total == fft_total else float("nan")
                fftc = fft.iloc[0] if len(fft) else None
                dacc = c["mean"] - fftc["mean"] if fftc is not None else float("nan")
                comparable = fftc is not None and dacc >= -tol(c["std"], fftc["std"])
                rows_all.append({"task": task, "partition": pname, "method": METHOD_LABEL.get(method, method),
                                 "final acc (%)": fmt_pct(c["mean"], c["std"])
                                 + ("" if learned(c["mean"], 1.0 / num_labels(task)) else " (chance)"),
                                 "Δ acc vs FFT": "-" if dacc != dacc else f"{100 * dacc:+.1f}" + ("" if comparable else " ✗"),
                                 "upload total (MB)": f"{total:.3g}",
                                 f"MB to {100 * target:.1f}%": f"{mb_t:.3g}" if mb_t == mb_t else f"not reached ({reached}/{len(b)})",
                                 "reduction vs FFT (to target)": "-" if red_t != red_t else f"{100 * red_t:.2f}%",
                                 "reduction vs FFT (total)": "-" if red_total != red_total else f"{100 * red_total:.2f}%"})
                raw_all.append(dict(task=task, partition=part, method=method, acc_mean=c["mean"], acc_std=c["std"],
                                    n=c["n"], delta_acc_vs_fft=dacc, comparable=comparable, upload_total_MB=total,
                                    fft_learned=fftc is not None and learned(fftc["mean"], 1.0 / num_labels(task)),
                                    target_acc=target, MB_to_target=mb_t, seeds_reaching_target=reached,
                                    reduction_to_target=red_t, reduction_total=red_total))
            fig, ax = plt.subplots(figsize=(5.6, 3.6))
            for i, method in enumerate(_methods(a)):
                cm = cp[cp.method == method].groupby("round").agg(acc=("acc", "mean"), sd=("acc", "std"),
                                                                  mb=("cum_up_MB", "mean")).reset_index()
                sd = cm["sd"].fillna(0.0)
                ax.plot(cm["mb"], 100 * cm["acc"], marker="osD^v"[i % 5], ms=3, ls=["-", "--", "-.", ":"][i % 4],
                        color=f"C{i}", label=METHOD_LABEL.get(method, method))
                ax.fill_between(cm["mb"], 100 * (cm["acc"] - sd), 100 * (cm["acc"] + sd), color=f"C{i}", alpha=0.15)
            ax.axhline(100 * target, color="black", ls="--", lw=0.8, label=f"target {100 * target:.1f}%")
            ax.axhline(100 / num_labels(task), color="grey", ls=":", lw=1, label="chance")
            ax.set_xscale("log")
            ax.set_xlabel("cumulative upload, all clients of one federation (MB, log scale)")
            ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
            ax.set_title(f"{task}{', ' + pname if pname else ''}: accuracy vs communication")
            ax.legend(fontsize=7)
            fig.tight_layout()
            tag = f"{task}" + (f"_{part}" if part else "")
            w.figure(f"accuracy_vs_upload_{tag}", fig,
                     f"{task} {pname}: accuracy vs cumulative uploaded MB (mean over seeds, band = 1 std).")
    disp = pd.DataFrame(rows_all)
    # one table per target column name clash: normalise the target column
    tcols = [c for c in disp.columns if c.startswith("MB to ")]
    if len(tcols) > 1:
        disp["MB to target"] = disp[tcols].bfill(axis=1).iloc[:, 0]
        disp = disp.drop(columns=tcols)
    w.table("bytes_to_target", disp.set_index(["task", "partition", "method"]), pd.DataFrame(raw_all),
            f"Upload needed to reach {frac:g} x FedAvg-FFT's final accuracy (mean over seeds) and reduction vs "
            f"FedAvg-FFT; ✗ = accuracy not comparable to FFT (below by more than max(2 points, seed std)).")
    ctx["communication"] = pd.DataFrame(raw_all)
    return runs


# ============================================================================= claims

from scripts.verdicts import MARGIN, combine, paired_verdict  # noqa: E402


def _v(ok, bad):
    return "reproduced" if ok else "not reproduced" if bad else "inconclusive"


def claims(ctx):
    """[(paper, claim, family, verdict, numbers)]."""
    out = []
    a, seeds = ctx.get("ffa_table"), ctx.get("ffa_table_seeds")
    if a is not None and len(a):
        priv = [p for p in _privacy_order(a["privacy"]) if p != "non-private"]
        parts, verdicts = [], []
        for task in sorted(a["task"].unique()):
            for lev in ["non-private"] + priv:
                f = a[(a.task == task) & (a.method == "ffa_lora") & (a.privacy == lev)]
                g = a[(a.task == task) & (a.method == "fedavg_lora") & (a.privacy == lev)]
                if f.empty or g.empty:
                    continue
                f, g = f.iloc[0], g.iloc[0]
                d, s = f["mean"] - g["mean"], max(f["std"], g["std"])
                parts.append(f"{task} {lev}: FFA {100 * f['mean']:.1f}±{100 * f['std']:.1f} vs FedAvg "
                             f"{100 * g['mean']:.1f}±{100 * g['std']:.1f} (Δ {100 * d:+.1f})")
                if priv and lev == priv[-1]:             # the smallest epsilon decides
                    dead = not learned(max(f["mean"], g["mean"]), 1.0 / num_labels(task))
                    v = paired_verdict(*(_per_seed(seeds, task=task, method=m, privacy=lev)
                                         for m in ("ffa_lora", "fedavg_lora")))
                    parts[-1] += " [no verdict, both at chance]" if dead else f" [{v.text()}]"
                    verdicts.append("inconclusive (both at chance)" if dead else v.verdict)
        rule = (f" Verdict from the smallest ε ({priv[-1]}), paired by seed: reproduced if the 95% interval of "
                f"FFA − FedAvg lies above 0, refuted if it lies below +{100 * MARGIN:.0f} point, underpowered "
                f"otherwise; inconclusive if both are at chance." if priv else " No private runs.")
        out.append(("FFA-LoRA", "better than FedAvg-LoRA under DP, especially at small ε", "ffa_table",
                    _combine(verdicts), "; ".join(parts) + "." + rule))
    r = ctx.get("alpha_ranges")
    if r is not None and len(r):
        parts, verdicts = [], []
        for (task, priv), g in r.groupby(["task", "privacy"], sort=True):
            f, v = g[g.method == "ffa_lora"], g[g.method == "fedavg_lora"]
            if f.empty or v.empty:
                continue
            f, v = f.iloc[0], v.iloc[0]
            s = max(f["mean_std"], v["mean_std"])
            parts.append(f"{task} {priv}: accuracy range over α FFA {100 * f['range']:.1f} vs FedAvg "
                         f"{100 * v['range']:.1f} points (mean seed std {100 * s:.1f}); above chance at "
                         f"{f['learned_cells']}/{f['cells']} (FFA) and {v['learned_cells']}/{v['cells']} (FedAvg) α values")
            # a method at chance at most α values has a small range because it hardly learns, not because
            # it is insensitive: no verdict then
            dead = min(f["learned_cells"], v["learned_cells"]) * 2 <= f["cells"]
            verdicts.append("inconclusive" if dead else _v(f["range"] + s < v["range"], f["range"] > v["range"] + s))
        out.append(("FFA-LoRA", "insensitive to the LoRA scaling α (FedAvg-LoRA is not)", "alpha",
                    _combine(verdicts), "; ".join(parts) + " (inconclusive when a method is above chance at no more "
                                                           "than half of the α values)"))
    sl = ctx.get("slora")
    if sl is not None and sl["fft"] is not None:
        d = sl["density"]
        c = d.iloc[(d["density"] - 0.01).abs().argsort().iloc[0]]
        fft = sl["fft"]
        delta = c["mean"] - fft["mean"]
        t = tol(c["std"], fft["std"])
        dead = not learned(fft["mean"], sl["chance"])         # "comparable" to a model at chance says nothing
        out.append(("SLoRA", "comparable to full fine-tuning at ~1% density", "slora",
                    "inconclusive" if dead else _v(delta >= -t, delta < -t),
                    f"density {c['density']:g}: SLoRA {100 * c['mean']:.1f}±{100 * c['std']:.1f} vs FedAvg-FFT "
                    f"{100 * fft['mean']:.1f}±{100 * fft['std']:.1f} (Δ {100 * delta:+.1f}; comparable = Δ ≥ −max(2, std) points; inconclusive if FedAvg-FFT is at chance)"))
    elif "slora_ran" in ctx:
        out.append(("SLoRA", "comparable to full fine-tuning at ~1% density", "slora", "inconclusive",
                    "no FedAvg-FFT reference run at the same setting"))
    gaps, het = ctx.get("peft_gap"), ctx.get("heterogeneity_seeds")
    if gaps:
        parts, verdicts = [], []
        for task, g in sorted(gaps.items()):
            g = g.copy()
            g["order"] = [_partition_key(k) for k in g["key"]]
            g = g.sort_values("order")
            first, last = g.iloc[0], g.iloc[-1]
            parts.append(f"{task}: FFT − LoRA " + ", ".join(f"{p} {100 * x:+.1f}" for p, x in zip(g["partition"], g["gap"])))
            dead = not (first["fft_learned"] and last["fft_learned"])     # a gap to a chance-level FFT is no gap
            gap = {k: {s_: _per_seed(het, task=task, method="fedavg_fft", partition=k)[s_]
                       - _per_seed(het, task=task, method=PEFT_METHOD, partition=k)[s_]
                       for s_ in set(_per_seed(het, task=task, method="fedavg_fft", partition=k))
                       & set(_per_seed(het, task=task, method=PEFT_METHOD, partition=k))}
                   for k in (first["key"], last["key"])}
            v = paired_verdict(gap[last["key"]], gap[first["key"]])
            parts[-1] += f" [growth {first['partition']} → {last['partition']}: " + (
                "no verdict, FedAvg-FFT at chance]" if dead else f"{v.text()}]")
            verdicts.append("inconclusive (FedAvg-FFT at chance)" if dead else v.verdict)
        out.append(("SLoRA", "the gap of PEFT (LoRA) to full fine-tuning widens as data grow more heterogeneous "
                    "(Dirichlet α shrinks)", "heterogeneity",
                    _combine(verdicts), "; ".join(parts) + " (paired by seed: reproduced if the 95% interval of the "
                                                           "gap's growth lies above 0; inconclusive unless FedAvg-FFT "
                                                           "is above chance at both ends)"))
    cm = ctx.get("communication")
    if cm is not None and len(cm):
        parts, verdicts = [], []
        for (task, part), g in cm.groupby(["task", "partition"], sort=True, dropna=False):
            sa, fl = g[g.method == "sa_fedlora"], g[g.method == "fedavg_lora"]
            if sa.empty or g[g.method == "fedavg_fft"].empty:
                continue
            sa = sa.iloc[0]
            red = sa["reduction_to_target"] if sa["reduction_to_target"] == sa["reduction_to_target"] else sa["reduction_total"]
            how = "to target" if sa["reduction_to_target"] == sa["reduction_to_target"] else "total"
            txt = (f"{task} {_partition_name(part) if isinstance(part, str) else ''}: SA-FedLoRA reduction vs FFT "
                   f"{100 * red:.2f}% ({how}), Δacc {100 * sa['delta_acc_vs_fft']:+.1f} points")
            if len(fl):
                txt += f"; FedAvg-LoRA reduction {100 * fl.iloc[0]['reduction_total']:.2f}% (total)"
            if not sa["fft_learned"]:                 # comparable to a chance-level FFT says nothing
                txt += " (FedAvg-FFT at chance: no verdict)"
                verdicts.append("inconclusive")
            else:
                verdicts.append(_v(red >= 0.9362 and sa["comparable"], not sa["comparable"]))
            parts.append(txt)
        if parts:
            out.append(("SA-FedLoRA", "communication reduced by up to 93.62% vs FedAvg-FFT at comparable accuracy",
                         "communication", _combine(verdicts), "; ".join(parts)))
    return out


def _per_seed(df, **where):
    """{seed: accuracy} of the finished federations matching `where` (column == value)."""
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    return dict(zip(sel["seed"].astype(int), sel["acc"].astype(float)))


def _combine(verdicts):
    return combine(verdicts) if verdicts else "inconclusive"


# ============================================================================= partitions and provenance

def partition_heatmaps(root, profile, all_runs):
    """One heatmap per distinct split (task, partition, clients, seed) from the runs' partitions.csv."""
    from partitions import plot_partition_heatmap
    out = Path(root) / "partitions" / profile
    if out.is_dir():
        shutil.rmtree(out)
    seen, items = {}, []
    for r in all_runs:
        p = r["dir"] / "partitions.csv"
        if not p.exists() or not r["cfg"]:
            continue
        tab = pd.read_csv(p)
        for seed, t in tab.groupby("seed", sort=True):
            t = t.drop(columns="seed").set_index("client")
            key = hashlib.sha256(t.to_csv().encode()).hexdigest()[:10]
            cfg = r["cfg"]
            part = dict(cfg["partition"])
            pname = part.pop("name")
            desc = "_".join([cfg["task"], pname] + [f"{k}{v}" for k, v in sorted(part.items())] +
                            [f"c{cfg['num_clients']}", f"n{cfg['train_subsample'] or 'all'}", f"s{seed}"])
            if desc in seen:
                continue
            seen[desc] = key
            out.mkdir(parents=True, exist_ok=True)
            t.to_csv(out / f"{desc}.csv", lineterminator="\n")
            plot_partition_heatmap(t, [out / f"{desc}.png"], title=desc.replace("_", " "))
            items.append(out / f"{desc}.png")
    return sorted(items)


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


# ============================================================================= README

DEVIATIONS = """\
## How this differs from the papers

- **Backbone.** Every run uses `all-MiniLM-L6-v2` (a 6-layer, 384-wide sentence-transformers encoder,
  22M parameters, contrastively trained on about a billion sentence pairs including NLI data) with a fresh
  linear classification head on its mean-pooled sentence embedding (the pooling it was trained with; runs
  whose summary.json says `pooling: cls` used [CLS] and the BERT pooler); the `quick` profile keeps only its first layers
  (`num_hidden_layers`). The papers fine-tune much larger backbones (e.g. RoBERTa-Large in FFA-LoRA), so
  absolute accuracies are lower and gaps between methods can differ in size and even in sign.
- **Data.** MNLI training uses the 19% uniform subset shipped in `../shared/data` (74,569 pairs) and is
  evaluated on `validation_matched`; SST-2, RTE and 20 Newsgroups are the full public splits (the `quick`
  profile subsamples them, see each family's setting line). MNLI has no genre column here, so non-IID MNLI
  splits are by label only. Where a family's `quick` profile replaces MNLI or 20 Newsgroups with SST-2,
  its notes say why.
- **Scale.** Fewer clients, rounds, local steps and seeds than the papers (the `paper` profile moves toward
  their scale on a GPU). Privacy: DP-SGD with per-sample clipping and Poisson sampling on every client,
  accounted per client with RDP over all of its local steps; the papers' exact accounting choices may differ.
- **Methods.** Implementation choices and interpretations are documented in each `methods/*.py` docstring
  (e.g. SA-FedLoRA's rank reduction by server-side SVD truncation; SLoRA's random sparse mask).
"""


def write_readme(root, profile, sections, claim_rows, heatmaps, notes_by_family):
    root = Path(root)
    lines = ["# Results", "",
             f"Generated by `python -m scripts.figures` (called by `make reproduce`) from the saved runs of profile "
             f"**{profile}** under `{profile}` subdirectories; rebuild with `make figures` (no training).", "",
             "Accuracy is the global model's final accuracy on the task's evaluation split (MNLI: validation_matched, "
             "SST-2/RTE: validation, 20 Newsgroups: test), mean ± sample std over seeds (each seed is an "
             "independent federation trained in the same batched pass). `(chance)` marks cells within 5 points of "
             "chance level: those runs did not learn and say nothing about the methods. `≈` marks differences "
             "smaller than the seed spread (the larger of the two std); `†` marks the best method of a column or "
             "one within the seed spread of it.", ""]
    lines += ["## Seed-paper claims and what we measured", "",
              "| paper | claim | family | outcome | numbers |", "|---|---|---|---|---|"]
    for paper, claim, fam, verdict, numbers in claim_rows:
        lines.append(f"| {paper} | {claim} | {fam} | **{verdict}** | {numbers} |")
    if not claim_rows:
        lines.append("| - | no family with the runs a claim needs has finished | - | - | - |")
    lines += ["", "Criteria. FFA-LoRA under DP and the SLoRA heterogeneity gap: paired by seed (seed s of both arms "
              "sees the same partition, clients and batches), 95% t-interval of the mean difference: **reproduced** "
              f"if it lies above 0, **refuted** if it lies below +{100 * MARGIN:.0f} point, **underpowered** otherwise "
              "(with the number of seeds that would decide at the observed spread); see scripts/verdicts.py. "
              f"The other claims: \"comparable\" = accuracy not below the reference by more than max({100 * COMPARABLE_TOL:.0f} "
              "points, the larger seed std), \"better\" = the difference exceeds the larger seed std. Learning rates "
              "(and, under DP, clip norms) where a run says `tuned` were chosen on a dev split held out from the "
              "training rows, never on the reported split; tuning a private run on the clients' data spends privacy "
              "that the reported ε does not count, as in most DP papers.", ""]
    lines.append(DEVIATIONS)
    for fam, (setting, status_lines, prov, items) in sections.items():
        lines += [f"## {fam}", ""]
        for n in notes_by_family.get(fam, []):
            lines.append(f"- {n}")
        if setting:
            lines.append(f"- Setting: {setting}")
        for p in prov:
            lines.append(f"- Produced on: {p}")
        for s in status_lines:
            lines.append(f"- {s}")
        lines.append("")
        for kind, name, caption, paths, md in items:
            rel = [p.relative_to(root).as_posix() for p in paths]
            if kind == "table":
                lines += [f"**{caption}** ({', '.join(f'[{Path(x).suffix[1:]}]({x})' for x in rel)})", "", md]
            else:
                lines += [f"**{caption}** ([pdf]({rel[1]}))", "", f"![{name}]({rel[0]})", ""]
    if heatmaps:
        lines += ["## Partitions", "", "Per-client label counts of every split used (one heatmap per task, "
                  "partition, client count, train subset and seed; counts in the CSV next to each image):", ""]
        for h in heatmaps:
            rel = h.relative_to(root).as_posix()
            lines.append(f"- [{h.stem}]({rel})")
        lines.append("")
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("\n".join(lines).rstrip() + "\n")


def tuning_table(w, runs, root):
    """The tuning passes of a family's tuned runs: every grid point's mean dev accuracy, the choice marked."""
    rows, raw = [], []
    users = {}                                  # tuning pass -> the runs that use its choice (one pass may serve several)
    for r in runs:
        tuned = r["meta"].get("tuned")
        if tuned:
            users.setdefault(tuned["tuning_dir"], []).append(r["name"])
    for tuning_dir, names in users.items():
        path = Path(root) / tuning_dir / "tuning.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        keys = list(record["grid"])
        for row in record["table"]:
            point = {k: row[k] for k in keys}
            acc = row["dev_accuracy"]
            rows.append({"run": ", ".join(names), **{k: f"{v:g}" for k, v in point.items()},
                         "dev accuracy (%)": "-" if acc is None else f"{100 * acc:.1f}"
                         + (" ← chosen" if point == record["chosen"] else "")
                         + (" (edge of the grid: the best may lie beyond)" if point == record["chosen"] and any(
                             len(record["grid"][k]) > 1 and v in (min(record["grid"][k]), max(record["grid"][k]))
                             for k, v in point.items()) else ""),
                         "tuning seeds": ",".join(map(str, record["seeds"]))})
            raw.append({"run": ", ".join(names), **point, "dev_accuracy": acc, "chosen": point == record["chosen"],
                        "seeds": record["seeds"], "dev_fraction": record["dev_fraction"]})
    if rows:
        w.table("tuning", pd.DataFrame(rows).set_index("run"), pd.DataFrame(raw),
                "Tuning: each grid point's mean final accuracy on the dev split (training rows held out from every "
                "client), run as federations of one pass; the runs named use the chosen point on all their rows.")


# ============================================================================= main

RENDER = {"ffa_table": family_ffa_table, "heterogeneity": family_heterogeneity, "alpha": family_alpha,
          "rank": family_rank, "slora": family_slora, "dp_recipe": family_dp_recipe}


def available_profiles(root):
    root = Path(root)
    found = set()
    for fam in FAMILY_ORDER:
        for p in PROFILES:
            if (root / fam / p).is_dir():
                found.add(p)
    return [p for p in PROFILES if p in found]


def build(root, profile, families=None):
    from scripts.reproduce import expand, load_families
    root = Path(root)
    fam_docs = load_families(families) if families else load_families()
    ctx = {"root": root, "profile": profile}
    sections, notes, all_runs = {}, {}, []
    for fam in [f for f in FAMILY_ORDER if f in fam_docs] + [f for f in fam_docs if f not in FAMILY_ORDER]:
        if profile not in fam_docs[fam].get("profiles", {}):
            others = ", ".join(fam_docs[fam].get("profiles", {}))
            sections[fam] = ("", [f"not part of the {profile} profile (profiles: {others}; "
                                  f"configs/{Path(fam_docs[fam]['_path']).name})"], [], [])
            notes[fam] = [fam_docs[fam].get("title", "")]
            continue
        prof = fam_docs[fam]["profiles"][profile]
        w = Writer(root, fam, profile)
        _clean(w.out)
        runs = load_runs(root, fam, profile)
        all_runs += runs
        notes[fam] = [fam_docs[fam].get("title", "")] + list(prof.get("notes", []))
        if "runs_from" in prof:
            used = family_communication(w, runs, ctx, prof)
            if not w.items:
                continue
            sections[fam] = (setting_line(used), [], provenance(used), w.items)
            continue
        if not runs:
            continue
        if fam == "slora":
            ctx["slora_ran"] = True
        RENDER.get(fam, lambda *_: None)(w, runs, ctx)
        tuning_table(w, runs, root)
        bad = [_status_line(r) for r in runs if r["summary"].get("status") != "finished"]
        planned = [spec["name"] for spec in expand(fam_docs[fam], profile)] if profile in fam_docs[fam].get(
            "profiles", {}) else []
        absent = [f"run `{n}`: not run yet" for n in planned if n not in {r["name"] for r in runs}]
        status = [f"{len(runs) - len(bad)} of {max(len(runs), len(planned))} runs finished"] + bad + absent
        sections[fam] = (setting_line(runs), status, provenance(runs), w.items)
    heat = partition_heatmaps(root, profile, all_runs)
    write_readme(root, profile, sections, claims(ctx), heat, notes)
    return sections


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, help="default: the only profile present, else the one "
                    "reproduce would pick ($PROFILE, paper with CUDA, quick)")
    ap.add_argument("--results", help="results root (default: $FEDSIM_RESULTS or results/)")
    ap.add_argument("--configs", help="directory of family YAML files (default configs/)")
    args = ap.parse_args(argv)
    from scripts.reproduce import detect_profile, results_root
    root = results_root(args.results)
    profile = args.profile
    if not profile:
        present = available_profiles(root)
        profile = present[0] if len(present) == 1 else detect_profile()
    sections = build(root, profile, args.configs)
    print(f"figures: profile {profile}, {sum(len(s[3]) for s in sections.values())} tables/figures in "
          f"{len(sections)} families -> {root / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
