"""Each seed paper's claim beside what the runs measured: numbers and a verdict (scripts/verdicts.py)."""
from scripts.figures.families.heterogeneity import PEFT_METHOD
from scripts.figures.load import num_labels, per_seed
from scripts.figures.style import learned, partition_key, partition_name, privacy_order, tol
from scripts.verdicts import MARGIN, combine, paired_verdict


def _v(ok, bad):
    return "reproduced" if ok else "not reproduced" if bad else "inconclusive"


def claims(results):
    """[(paper, claim, family, verdict, numbers)] from the families' typed results (scripts/figures/results.py),
    keyed by family name."""
    out = []
    table = results.get("ffa_table")
    a, seeds = (table.cells, table.seeds) if table is not None else (None, None)
    if a is not None and len(a):
        priv = [p for p in privacy_order(a["privacy"]) if p != "non-private"]
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
                    v = paired_verdict(*(per_seed(seeds, task=task, method=m, privacy=lev)
                                         for m in ("ffa_lora", "fedavg_lora")))
                    parts[-1] += " [no verdict, both at chance]" if dead else f" [{v.text()}]"
                    verdicts.append("inconclusive (both at chance)" if dead else v.verdict)
        rule = (f" Verdict from the smallest ε ({priv[-1]}), paired by seed: reproduced if the 95% interval of "
                f"FFA − FedAvg lies above 0, refuted if it lies below +{100 * MARGIN:.0f} point, underpowered "
                f"otherwise; inconclusive if both are at chance." if priv else " No private runs.")
        out.append(("FFA-LoRA", "better than FedAvg-LoRA under DP, especially at small ε", "ffa_table",
                    _combine(verdicts), "; ".join(parts) + "." + rule))
    r = results["alpha"].ranges if results.get("alpha") is not None else None
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
    sl = results.get("slora")
    if sl is not None and sl.fft is not None:
        d = sl.density
        c = d.iloc[(d["density"] - 0.01).abs().argsort().iloc[0]]
        fft = sl.fft
        delta = c["mean"] - fft["mean"]
        t = tol(c["std"], fft["std"])
        dead = not learned(fft["mean"], sl.chance)         # "comparable" to a model at chance says nothing
        out.append(("SLoRA", "comparable to full fine-tuning at ~1% density", "slora",
                    "inconclusive" if dead else _v(delta >= -t, delta < -t),
                    f"density {c['density']:g}: SLoRA {100 * c['mean']:.1f}±{100 * c['std']:.1f} vs FedAvg-FFT "
                    f"{100 * fft['mean']:.1f}±{100 * fft['std']:.1f} (Δ {100 * delta:+.1f}; comparable = Δ ≥ −max(2, std) points; inconclusive if FedAvg-FFT is at chance)"))
    elif sl is not None:
        out.append(("SLoRA", "comparable to full fine-tuning at ~1% density", "slora", "inconclusive",
                    "no FedAvg-FFT reference run at the same setting"))
    het_result = results.get("heterogeneity")
    gaps, het = (het_result.peft_gap, het_result.seeds) if het_result is not None else (None, None)
    if gaps:
        parts, verdicts = [], []
        for task, g in sorted(gaps.items()):
            g = g.copy()
            g["order"] = [partition_key(k) for k in g["key"]]
            g = g.sort_values("order")
            first, last = g.iloc[0], g.iloc[-1]
            parts.append(f"{task}: FFT − LoRA " + ", ".join(f"{p} {100 * x:+.1f}" for p, x in zip(g["partition"], g["gap"])))
            dead = not (first["fft_learned"] and last["fft_learned"])     # a gap to a chance-level FFT is no gap
            gap = {k: {s_: per_seed(het, task=task, method="fedavg_fft", partition=k)[s_]
                       - per_seed(het, task=task, method=PEFT_METHOD, partition=k)[s_]
                       for s_ in set(per_seed(het, task=task, method="fedavg_fft", partition=k))
                       & set(per_seed(het, task=task, method=PEFT_METHOD, partition=k))}
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
    cm = results["communication"].table if results.get("communication") is not None else None
    if cm is not None and len(cm):
        parts, verdicts = [], []
        for (task, part), g in cm.groupby(["task", "partition"], sort=True, dropna=False):
            sa, fl = g[g.method == "sa_fedlora"], g[g.method == "fedavg_lora"]
            if sa.empty or g[g.method == "fedavg_fft"].empty:
                continue
            sa = sa.iloc[0]
            red = sa["reduction_to_target"] if sa["reduction_to_target"] == sa["reduction_to_target"] else sa["reduction_total"]
            how = "to target" if sa["reduction_to_target"] == sa["reduction_to_target"] else "total"
            txt = (f"{task} {partition_name(part) if isinstance(part, str) else ''}: SA-FedLoRA reduction vs FFT "
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
    out += _method_claims(results.get("methods"))
    return out


# Claims of the methods family's papers, each "method beats FedAvg-LoRA" on the metric the paper reports,
# decided paired by seed per task: (paper, claim, method label, accuracy column)
METHOD_CLAIMS = [
    ("FedEx-LoRA", "exact aggregation beats FedAvg-LoRA (arXiv 2410.09432)", "fedex_lora", "acc"),
    ("FedSA-LoRA", "sharing only A beats FedAvg-LoRA on each client's own model (arXiv 2410.01463)", "fedsa_lora",
     "acc_personal"),
    ("SCAFFOLD", "control variates beat FedAvg under heterogeneous clients (arXiv 1910.06378)", "scaffold", "acc"),
    ("FedAdam", "an adaptive server optimizer beats FedAvg (arXiv 2003.00295)", "fedadam", "acc"),
]


def _method_claims(table):
    if table is None or table.seeds is None or table.seeds.empty:
        return []
    seeds, out = table.seeds, []
    for paper, claim, label, column in METHOD_CLAIMS:
        parts, verdicts = [], []
        for task in sorted(seeds["task"].unique()):
            arms = [seeds[(seeds.task == task) & (seeds.label == x)] for x in (label, "fedavg_lora")]
            if any(a.empty or column not in a or a[column].isna().all() for a in arms):
                continue
            per = [dict(zip(a["seed"].astype(int), a[column].astype(float))) for a in arms]
            means = [sum(p.values()) / len(p) for p in per]
            dead = not learned(max(means), 1.0 / num_labels(task))
            v = paired_verdict(*per)
            parts.append(f"{task}: {100 * means[0]:.1f} vs FedAvg-LoRA {100 * means[1]:.1f}"
                         + (" [no verdict, both at chance]" if dead else f" [{v.text()}]"))
            verdicts.append("inconclusive (both at chance)" if dead else v.verdict)
        if parts:
            metric = "personalized accuracy" if column == "acc_personal" else "accuracy"
            out.append((paper, claim, "methods", _combine(verdicts), "; ".join(parts) + f" ({metric}, paired by "
                        f"seed: reproduced if the 95% interval of the difference lies above 0)."))
    return out


def _combine(verdicts):
    return combine(verdicts) if verdicts else "inconclusive"
