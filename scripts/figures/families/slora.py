"""SLoRA's stage-1 density and length sweeps beside FedAvg-FFT / FedAvg-LoRA references at the same setting."""
import json

import matplotlib.pyplot as plt
import pandas as pd

from scripts.figures.families import register
from scripts.figures.load import agg, federation_frame, load_runs, num_labels, primary_split, sources
from scripts.figures.results import SLoRASweep
from scripts.figures.style import BARS, INTERVAL, METHOD_LABEL, errorbar, fmt_pct, learned, within_spread


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


@register("slora")
def family_slora(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return SLoRASweep(density=None, fft=None, chance=None)
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
    ref = _reference(ctx.root, ctx.profile, runs)
    refa = agg(ref, ["method"]) if not ref.empty else pd.DataFrame(columns=["method", "mean", "std", "n", "ci"])
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
            row = {axis: f"{c[axis]:g}", "SLoRA accuracy (%)": fmt_pct(c["mean"], c["ci"], c["n"]) +
                   ("" if learned(c["mean"], chance) else " (chance)")}
            if fft is not None:
                d = c["mean"] - fft["mean"]
                row["Δ vs FedAvg-FFT (points)"] = f"{100 * d:+.1f}" + (
                    " ≈" if within_spread(c["mean"], c["std"], fft["mean"], fft["std"]) else "")
            rows.append(row)
            raw.append(dict(axis=axis, value=c[axis], mean=c["mean"], std=c["std"], n=c["n"],
                            fft_mean=None if fft is None else fft["mean"], fft_std=None if fft is None else fft["std"],
                            **sources(c)))
        for _, rr in refa.iterrows():
            rows.append({axis: f"ref: {METHOD_LABEL[rr['method']]}",
                         "SLoRA accuracy (%)": fmt_pct(rr["mean"], rr["ci"], rr["n"]),
                         **({"Δ vs FedAvg-FFT (points)": ""} if fft is not None else {})})
        tables[axis] = a
        w.table(f"{axis}", pd.DataFrame(rows).set_index(axis), pd.DataFrame(raw),
                f"{task}: SLoRA accuracy vs {axis.replace('_', ' ')} ({other.replace('_', ' ')} {fixed[axis]:g}), "
                f"{INTERVAL}; references from the heterogeneity family at the same setting; "
                f"≈ = difference within the seed spread.")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.1))
    for ax, axis, xl in zip(axes, ("density", "stage1_rounds"), ("stage-1 density (fraction of entries)",
                                                                  "stage-1 length (rounds)")):
        a = tables[axis]
        errorbar(ax, a[axis], 100 * a["mean"], 100 * a["ci"], "SLoRA")
        for _, rr in refa.iterrows():
            if rr["ci"] == rr["ci"]:                 # one seed: no interval to shade
                ax.axhspan(100 * (rr["mean"] - rr["ci"]), 100 * (rr["mean"] + rr["ci"]), alpha=0.15,
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
    w.figure("slora_density_stage1", fig, f"SLoRA accuracy vs stage-1 density and length; {BARS}; bands = the "
             f"references' 95% intervals.")
    return SLoRASweep(density=tables["density"], fft=fft, chance=chance)
