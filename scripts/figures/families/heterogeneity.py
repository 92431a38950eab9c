"""Accuracy vs label skew per task, and SLoRA's gap of PEFT (LoRA) to full fine-tuning by skew."""
import matplotlib.pyplot as plt
import pandas as pd

from scripts.figures.families import register
from scripts.figures.load import agg, federation_frame, num_labels, primary_split, sources
from scripts.figures.results import Heterogeneity
from scripts.figures.style import (BARS, INTERVAL, METHOD_LABEL, errorbar, fmt_pct, learned, method_color,
                                   methods_present, partition_key, partition_name, within_spread)


PEFT_METHOD = "fedavg_lora"       # the PEFT side of the SLoRA paper's gap claim (plain LoRA; SLoRA is its fix)


@register("heterogeneity")
def family_heterogeneity(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return
    a = agg(df, ["task", "method", "partition"])
    peft_gap = {}
    for task in sorted(a["task"].unique()):
        at = a[a.task == task]
        parts = sorted(at["partition"].unique(), key=partition_key)     # each task its own skew levels
        names = [partition_name(p) for p in parts]
        chance = 1.0 / num_labels(task)
        disp_rows, raw = [], []
        best = {p: at[at.partition == p].sort_values("mean", ascending=False).iloc[0] for p in parts
                if not at[at.partition == p].empty}
        for method in methods_present(at):
            row = {"method": METHOD_LABEL.get(method, method)}
            for p, nm in zip(parts, names):
                c = at[(at.method == method) & (at.partition == p)]
                if c.empty:
                    row[nm] = "-"
                    continue
                c = c.iloc[0]
                b = best[p]
                tie = c["method"] != b["method"] and within_spread(c["mean"], c["std"], b["mean"], b["std"])
                row[nm] = fmt_pct(c["mean"], c["ci"], c["n"]) + (" †" if tie or c["method"] == b["method"] else "") + \
                    ("" if learned(c["mean"], chance) else " (chance)")
                raw.append(dict(task=task, method=method, partition=p, mean=c["mean"], std=c["std"], n=c["n"],
                                best_or_within_spread_of_best=bool(tie or c["method"] == b["method"]), **sources(c)))
            disp_rows.append(row)
        w.table(f"accuracy_{task}", pd.DataFrame(disp_rows).set_index("method"), pd.DataFrame(raw),
                f"{task}: final accuracy (%) by label skew (Dirichlet α; IID = no skew), {INTERVAL}; "
                f"† = best in its column or within the seed spread of the best.")
        gap_rows = []      # SLoRA's motivating claim: the gap of PEFT (LoRA) to full fine-tuning widens with skew
        for p, nm in zip(parts, names):
            f = at[(at.method == "fedavg_fft") & (at.partition == p)]
            s = at[(at.method == PEFT_METHOD) & (at.partition == p)]
            if f.empty or s.empty:
                continue
            f, s = f.iloc[0], s.iloc[0]
            gap_rows.append(dict(partition=nm, key=p, gap=f["mean"] - s["mean"], spread=max(f["std"], s["std"]),
                                 seeds=int(min(f["n"], s["n"])),
                                 within_spread=within_spread(f["mean"], f["std"], s["mean"], s["std"]),
                                 fft_learned=learned(f["mean"], chance)))
        if gap_rows:
            g = pd.DataFrame(gap_rows)
            disp = pd.DataFrame({"partition": g["partition"],
                                 "FFT − LoRA (points)": [f"{100 * x:+.1f}" + (" ≈" if fl else "")
                                                          for x, fl in zip(g["gap"], g["within_spread"])],
                                 "seed spread": [f"{100 * x:.1f}" if k > 1 else "- (1 seed)"
                                                 for x, k in zip(g["spread"], g["seeds"])]}).set_index("partition")
            w.table(f"peft_gap_{task}", disp, g.drop(columns="key"),
                    f"{task}: accuracy gap FedAvg-FFT minus FedAvg-LoRA by label skew; ≈ = within the seed spread.")
            peft_gap[task] = g
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for method in methods_present(at):
            c = at[at.method == method].set_index("partition").reindex(parts)
            errorbar(ax, range(len(parts)), 100 * c["mean"], 100 * c["ci"], METHOD_LABEL.get(method, method),
                     color=method_color(method))
        ax.axhline(100 * chance, color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(parts)), names)
        ax.set_xlabel("label skew (Dirichlet α, smaller = more heterogeneous)")
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)")
        ax.set_title(f"{task}: accuracy vs heterogeneity")
        ax.legend(ncol=2)
        fig.tight_layout()
        w.figure(f"accuracy_vs_alpha_{task}", fig, f"{task}: accuracy vs Dirichlet α ({BARS}).")
    return Heterogeneity(cells=a, seeds=df, peft_gap=peft_gap)
