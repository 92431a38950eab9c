"""FFA-LoRA's table: accuracy by method and privacy level, FFA − FedAvg per level."""
import matplotlib.pyplot as plt
import pandas as pd

from scripts.figures.families import register
from scripts.figures.load import agg, federation_frame, num_labels, primary_split, sources
from scripts.figures.results import FFATable
from scripts.figures.style import (BARS, INTERVAL, METHOD_LABEL, errorbar, fmt_pct, learned, method_color,
                                   methods_present, privacy_order, within_spread)


@register("ffa_table")
def family_ffa_table(w, runs, ctx):
    df = federation_frame(runs, privacy=True)
    if df.empty:
        return
    a = agg(df, ["task", "method", "privacy"])
    a["chance"] = [1.0 / num_labels(t) for t in a["task"]]
    levels = privacy_order(a["privacy"])
    disp_rows, raw = [], []
    for task in sorted(a["task"].unique()):
        for method in methods_present(a[a.task == task]):
            row = {"task": task, "method": METHOD_LABEL.get(method, method)}
            for lev in levels:
                c = a[(a.task == task) & (a.method == method) & (a.privacy == lev)]
                if c.empty:
                    row[lev] = "-"
                    continue
                c = c.iloc[0]
                mark = "" if learned(c["mean"], c["chance"]) else " (chance)"
                row[lev] = fmt_pct(c["mean"], c["ci"], c["n"]) + mark
                raw.append(dict(task=task, method=method, privacy=lev, mean=c["mean"], std=c["std"], n=c["n"],
                                **sources(c)))
            disp_rows.append(row)
    disp = pd.DataFrame(disp_rows).set_index(["task", "method"])
    w.table("accuracy", disp, pd.DataFrame(raw),
            f"Final accuracy (%) of the global model by privacy level (δ=1e-5); {INTERVAL}.")
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
        for method in methods_present(a[a.task == task]):
            c = a[(a.task == task) & (a.method == method)].set_index("privacy").reindex(levels)
            errorbar(ax, range(len(levels)), 100 * c["mean"], 100 * c["ci"], METHOD_LABEL.get(method, method),
                     color=method_color(method))
        ax.axhline(100 / num_labels(task), color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(levels)), levels)
        ax.set_xlabel("privacy level (δ=1e-5)")
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
        ax.set_title(task)
        ax.legend()
    fig.tight_layout()
    w.figure("accuracy_vs_privacy", fig, f"Accuracy vs privacy level; {BARS}.")
    return FFATable(cells=a, seeds=df)
