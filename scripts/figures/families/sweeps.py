"""Sensitivity sweeps: accuracy vs the LoRA scaling α and vs the LoRA rank (with upload per round)."""
import matplotlib.pyplot as plt
import pandas as pd

from scripts.figures.families import register
from scripts.figures.load import agg, federation_frame, num_labels, primary_split, sources
from scripts.figures.results import AlphaSweep
from scripts.figures.style import (BARS, INTERVAL, METHOD_LABEL, errorbar, fmt_pct, learned, method_color,
                                   methods_present)


def _accuracy_panels(axes, groups, key, xs, xlabel):
    """One panel per (task, privacy) group: accuracy of each method vs `key` over xs (log2 axis)."""
    for ax, ((task, priv), at) in zip(axes, groups):
        for method in methods_present(at):
            c = at[at.method == method].set_index(key).reindex(xs)
            errorbar(ax, xs, 100 * c["mean"], 100 * c["ci"], METHOD_LABEL.get(method, method),
                     color=method_color(method))
        ax.axhline(100 / num_labels(task), color="grey", ls=":", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
        ax.set_title(f"{task}, {priv}")
        ax.legend()


def tuned_per_alpha(run):
    """Whether a run of the alpha family is one point of a per-α tuned curve (its learning rate tuned at its
    own α) rather than a fixed-learning-rate sweep over α inside one pass."""
    return bool(run["meta"].get("tuned")) and run["cfg"] is not None and \
        "lora.alpha" not in (run["cfg"].get("sweep") or {})


def alpha_ranges(a):
    """task, privacy, method: the range (max - min) of the mean accuracy over α, the mean seed std, the cells
    that learned, the fewest seeds of a cell. a: agg() of a federation frame by task, privacy, method, α."""
    rows = []
    for (task, priv, method), g in a.groupby(["task", "privacy", "method"], sort=True):
        rows.append(dict(task=task, privacy=priv, method=method, range=g["mean"].max() - g["mean"].min(),
                         mean_std=g["std"].mean(), cells=len(g), min_seeds=int(g["n"].min()),
                         learned_cells=int(sum(learned(m, 1.0 / num_labels(task)) for m in g["mean"]))))
    return pd.DataFrame(rows)


def _alpha_table(w, runs, name, how):
    """The accuracy-vs-α table and figure of one reading (fixed or tuned learning rate); returns the agg frame."""
    df = federation_frame(runs, privacy=True)
    if df.empty:
        return None
    a = agg(df, ["task", "privacy", "method", "lora.alpha"])
    alphas = sorted(a["lora.alpha"].unique())
    disp_rows, raw = [], []
    ranges = alpha_ranges(a).set_index(["task", "privacy", "method"])
    for (task, priv), at in a.groupby(["task", "privacy"], sort=True):
        for method in methods_present(at):
            c = at[at.method == method].set_index("lora.alpha").reindex(alphas)
            row = {"task": task, "privacy": priv, "method": METHOD_LABEL.get(method, method)}
            for al in alphas:
                row[f"α={al:g}"] = fmt_pct(c.loc[al, "mean"], c.loc[al, "ci"], c.loc[al, "n"])
                raw.append(dict(task=task, privacy=priv, method=method, lora_alpha=al, mean=c.loc[al, "mean"],
                                std=c.loc[al, "std"], n=c.loc[al, "n"], **sources(c.loc[al])))
            row["range (max−min)"] = f"{100 * ranges.loc[(task, priv, method), 'range']:.1f}"
            disp_rows.append(row)
    suffix = "" if name == "accuracy" else name[len("accuracy"):]
    w.table(name, pd.DataFrame(disp_rows).set_index(["task", "privacy", "method"]), pd.DataFrame(raw),
            f"Final accuracy (%) vs LoRA scaling α (scale α/r), {how}, {INTERVAL}; range = max − min of the means.")
    groups = list(a.groupby(["task", "privacy"], sort=True))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.8 * len(groups), 3.1), squeeze=False)
    _accuracy_panels(axes[0], groups, "lora.alpha", alphas, "LoRA α (scale = α / r)")
    fig.tight_layout()
    w.figure(f"accuracy_vs_lora_alpha{suffix}", fig, f"Accuracy vs LoRA α, {how} ({BARS}).")
    return a


@register("alpha")
def family_alpha(w, runs, ctx):
    fixed = _alpha_table(w, [r for r in runs if not tuned_per_alpha(r)], "accuracy",
                         "learning rate fixed across α, with and without DP")
    tuned = _alpha_table(w, [r for r in runs if tuned_per_alpha(r)], "accuracy_tuned",
                         "learning rate tuned per α (one run per α, tuned on the dev split)")
    if fixed is None and tuned is None:
        return None
    return AlphaSweep(ranges=alpha_ranges(fixed) if fixed is not None else None,
                      tuned=alpha_ranges(tuned) if tuned is not None else None)


@register("rank")
def family_rank(w, runs, ctx):
    df = federation_frame(runs, privacy=True)
    if df.empty:
        return
    df["rank"] = df["lora_rank"]
    rounds = {r["name"]: r["cfg"]["rounds"] for r in runs if r["cfg"]}
    df["up_MB_per_round"] = [m / rounds[n] for m, n in zip(df["cum_up_MB"], df["run"])]
    a = agg(df, ["task", "privacy", "method", "rank"])
    mb = agg(df, ["task", "privacy", "method", "rank"], "up_MB_per_round")
    ranks = sorted(a["rank"].unique())
    disp_rows, raw = [], []
    for (task, priv), at in a.groupby(["task", "privacy"], sort=True):
        for method in methods_present(at):
            row = {"task": task, "privacy": priv, "method": METHOD_LABEL.get(method, method)}
            for r_ in ranks:
                c = at[(at.method == method) & (at["rank"] == r_)]
                row[f"r={r_}"] = fmt_pct(c["mean"].iloc[0], c["ci"].iloc[0], c["n"].iloc[0]) if len(c) else "-"
                if len(c):
                    up = mb[(mb.task == task) & (mb.privacy == priv) & (mb.method == method) & (mb["rank"] == r_)]
                    raw.append(dict(task=task, privacy=priv, method=method, rank=r_, mean=c["mean"].iloc[0],
                                    std=c["std"].iloc[0], n=c["n"].iloc[0], up_MB_per_round=up["mean"].iloc[0]))
            disp_rows.append(row)
    w.table("accuracy", pd.DataFrame(disp_rows).set_index(["task", "privacy", "method"]), pd.DataFrame(raw),
            f"Final accuracy (%) vs LoRA rank r, {INTERVAL} (upload MB per round in the CSV).")
    groups = list(a.groupby(["task", "privacy"], sort=True))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(3.8 * (len(groups) + 1), 3.1), squeeze=False)
    _accuracy_panels(axes[0], groups, "rank", ranks, "LoRA rank r")
    ax = axes[0][-1]
    for method in methods_present(mb):
        c = mb[mb.method == method].groupby("rank")["mean"].mean()
        ax.plot(c.index, c.values, marker="o", ms=4, label=METHOD_LABEL.get(method, method))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("upload per round, all sampled clients (MB)")
    ax.set_title("communication per round")
    ax.legend()
    fig.tight_layout()
    w.figure("accuracy_vs_rank", fig, f"Accuracy and upload per round vs LoRA rank ({BARS}).")
