"""Every method side by side (configs/methods.yaml): final and personalized accuracy, upload per round, the
privacy unit and epsilon, each method against FedAvg-LoRA; accuracy vs cumulative upload per task."""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fedsim.sampling import clients_per_round
from scripts.figures.families import register
from scripts.figures.load import MB, agg, ci_half, curve_frame, federation_frame, num_labels, primary_split
from scripts.figures.results import MethodsTable
from scripts.figures.style import INTERVAL, fmt_pct, learned, tol

BASELINE = "fedavg_lora"
# display names of the family's method labels (configs/methods.yaml), in table order
LABEL = {"fedavg_lora": "FedAvg-LoRA", "ffa_lora": "FFA-LoRA", "fedsa_lora": "FedSA-LoRA", "fedprox": "FedProx",
         "local_lora": "local-only LoRA (no federation)", "scaffold": "SCAFFOLD", "fedex_lora": "FedEx-LoRA",
         "flora": "FLoRA", "hetlora": "HetLoRA",
         "fedavgm": "FedAvg-LoRA + FedAvgM", "fedadam": "FedAvg-LoRA + FedAdam",
         "dp_sample_eps3": "FedAvg-LoRA, DP-SGD (sample) ε=3", "dp_client_eps3": "FedAvg-LoRA, DP-FedAvg (client) ε=3"}


MAJORITY = "local majority label (each client's own most frequent label)"


def _run_facts(run):
    """Upload and download per client in the first round (MB), DP unit, personalized accuracy per client."""
    cfg, first = run["cfg"], next((m for m in run["metrics"] if m["federation"] == 0), None)
    m = clients_per_round(cfg["num_clients"], cfg["client_fraction"])
    unit = run["summary"].get("dp_unit") if run["summary"].get("private") else None
    return dict(up_client_MB=first["up_bytes"] / m / MB if first else float("nan"), dp_unit=unit or "none")


def _order(labels):
    return [k for k in LABEL if k in labels] + sorted(set(labels) - set(LABEL))


@register("methods")
def family_methods(w, runs, ctx):
    df, cv = federation_frame(runs), curve_frame(runs)
    if df.empty:
        return MethodsTable(table=pd.DataFrame(), personal=pd.DataFrame(), seeds=df)
    label_of = {r["name"]: r["meta"]["labels"]["method"] for r in runs}
    facts = {r["name"]: _run_facts(r) for r in runs if r["cfg"] is not None}
    df["label"], cv["label"] = df["run"].map(label_of), cv["run"].map(label_of)
    personal = [dict(run=r["name"], task=r["cfg"]["task"], label=label_of[r["name"]], seed=f["seed"], client=c, acc=a)
                for r in runs if r["cfg"] is not None for f in r["summary"].get("federations", [])
                if f.get("status") == "finished"
                for c, a in enumerate(f.get("final_personal_per_client") or []) if a is not None]
    personal = pd.DataFrame(personal)
    raw_rows, personal_rows = [], []
    for task in sorted(df["task"].unique()):
        dt = df[df.task == task]
        chance = 1.0 / num_labels(task)
        a = agg(dt, ["label", "run"]).set_index("label")
        base = a.loc[BASELINE] if BASELINE in a.index else None
        rows = []
        for label in _order(a.index):
            c, run = a.loc[label], a.loc[label, "run"]
            cell = dt[dt.label == label]
            pers = cell["acc_personal"].mean() if "acc_personal" in cell and cell["acc_personal"].notna().any() \
                else float("nan")
            per_client = personal[(personal.run == run)].groupby("client")["acc"].mean() if len(personal) else \
                pd.Series(dtype=float)
            delta = c["mean"] - base["mean"] if base is not None else float("nan")
            beyond = base is not None and label != BASELINE and abs(delta) > tol(c["std"], base["std"])
            eps = cell["epsilon_spent"].mean() if cell["epsilon_spent"].notna().any() else None
            f = facts[run]
            rows.append({"method": LABEL.get(label, label),
                         "accuracy (%)": fmt_pct(c["mean"], c["ci"], c["n"]) + ("" if learned(c["mean"], chance) else " (chance)"),
                         "Δ vs FedAvg-LoRA": "-" if label == BASELINE or delta != delta else
                         f"{100 * delta:+.1f}" + (" *" if beyond else ""),
                         "personalized (%)": "-" if pers != pers else f"{100 * pers:.1f}",
                         "worst client (%)": "-" if per_client.empty else f"{100 * per_client.min():.1f}",
                         "upload / client / round (MB)": f"{f['up_client_MB']:.3g}",
                         "DP unit": f["dp_unit"], "ε spent": "-" if eps is None else f"{eps:.2f}"})
            raw_rows.append(dict(task=task, method=label, acc_mean=c["mean"], acc_std=c["std"], n=int(c["n"]),
                                 chance=chance, delta_vs_fedavg_lora=delta, beyond_seed_spread=beyond,
                                 personal_mean=pers, worst_client=per_client.min() if len(per_client) else np.nan,
                                 up_client_round_MB=f["up_client_MB"], dp_unit=f["dp_unit"], epsilon_spent=eps))
            for client, acc in per_client.items():
                personal_rows.append(dict(task=task, method=label, client=client, acc=acc))
        major = dt["personal_majority"].dropna() if "personal_majority" in dt else pd.Series(dtype=float)
        if len(major):               # a baseline of the personalized column only: nothing trained, nothing sent
            rows.append({"method": MAJORITY, **{k: "-" for k in rows[0] if k != "method"},
                         "personalized (%)": f"{100 * major.mean():.1f}"})
            raw_rows.append(dict(task=task, method="local_majority", personal_mean=major.mean(), n=len(major)))
        disp = pd.DataFrame(rows).set_index("method")
        w.table(f"methods_{task}", disp, pd.DataFrame([r for r in raw_rows if r["task"] == task]),
                f"{task}: final accuracy on {primary_split(task)} ({INTERVAL}; (chance) = within 5 points of "
                f"chance), the difference to FedAvg-LoRA (* = larger than max(2 points, the larger seed std)), "
                f"personalized accuracy (each client's own model on the rows held out of its data; FedSA-LoRA: with its "
                f"own B) and its worst client, upload per client and round, what DP protects and ε spent; the "
                f"personalized baselines: local-only LoRA (each client trains alone, sends nothing) and the local "
                f"majority label (each client predicts its own most frequent training label).")
        curves_figure(w, task, cv[cv.task == task], chance)
    return MethodsTable(table=pd.DataFrame(raw_rows), personal=pd.DataFrame(personal_rows), seeds=df)


def _curve(cv, label):
    """Mean accuracy, 95% half-width over seeds and mean cumulative upload per evaluated round of one method."""
    cm = cv[cv.label == label].groupby("round").agg(acc=("acc", "mean"), sd=("acc", "std"), n=("acc", "count"),
                                                    mb=("cum_up_MB", "mean")).reset_index()
    cm["half"] = [ci_half(sd, n) if n > 1 else 0.0 for sd, n in zip(cm["sd"].fillna(0.0), cm["n"])]
    return cm


def curves_figure(w, task, cv, chance):
    """Accuracy against cumulative upload, one small panel per method (FedAvg-LoRA in grey in each, for
    reference), mean over seeds with a band of the 95% interval; methods that send nothing are left out (no
    upload axis)."""
    labels = [x for x in _order(cv["label"].unique()) if x != BASELINE and _curve(cv, x)["mb"].gt(0).all()]
    if not labels:
        return
    base = _curve(cv, BASELINE) if BASELINE in set(cv["label"]) else None
    cols = min(4, len(labels))
    nrows = -(-len(labels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.5 * nrows), squeeze=False, sharex=True,
                             sharey=True)
    for ax, label in zip(axes.flat, labels):
        for cm, name, color in ([(base, LABEL[BASELINE], "0.6")] if base is not None else []) + \
                [(_curve(cv, label), LABEL.get(label, label), "C0")]:
            ax.plot(cm["mb"], 100 * cm["acc"], marker="o", ms=2.5, color=color, label=name)
            ax.fill_between(cm["mb"], 100 * (cm["acc"] - cm["half"]), 100 * (cm["acc"] + cm["half"]),
                            color=color, alpha=0.2, lw=0)
        ax.axhline(100 * chance, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(LABEL.get(label, label), fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("cumulative upload (MB, log)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"accuracy on {primary_split(task)} (%)", fontsize=7)
    fig.suptitle(f"{task}: accuracy vs communication, each method beside FedAvg-LoRA (grey)", fontsize=9)
    fig.tight_layout()
    w.figure(f"accuracy_vs_upload_{task}", fig, f"{task}: accuracy against the cumulative upload of one federation's "
             f"clients, one panel per method with FedAvg-LoRA in grey; mean over seeds, bands = 95% t-interval over "
             f"seeds at each evaluated round (the curve's rows: a fixed subset of the split where the run sets "
             f"curve_eval_subsample). Methods that send nothing (local-only) have no upload axis and are left out.")

