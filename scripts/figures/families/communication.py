"""Accuracy vs uploaded bytes over another family's runs, and the upload needed to reach a target accuracy."""
import matplotlib.pyplot as plt
import pandas as pd

from scripts.figures.load import (agg, ci_half, curve_frame, federation_frame, last_point, load_runs, num_labels,
                                  primary_split)
from scripts.figures.papers import MARKS
from scripts.figures.results import Communication
from scripts.figures.style import (METHOD_LABEL, fmt_pct, learned, method_color, methods_present,
                                   partition_key, partition_name, tol)


def bytes_to_target(curves, target):
    """Per federation: cumulative MB uploaded when accuracy first reaches target (NaN if never)."""
    out = []
    for (run, fed), c in curves.groupby(["run", "federation"], sort=True):
        c = c.sort_values("round")
        hit = c[c["acc"] >= target]
        out.append(dict(run=run, federation=fed, method=c["method"].iloc[0],
                        MB=hit["cum_up_MB"].iloc[0] if len(hit) else float("nan")))
    return pd.DataFrame(out)


def mb_to_target(bt, method):
    """(mean MB to the target over ALL of the method's seeds, or nan; what to print instead). A seed that never
    reached the target voids the mean: averaging only the seeds that reached it would flatter the method."""
    b = bt[bt.method == method]["MB"]
    if len(b) and b.notna().all():
        return float(b.mean()), "-"
    missed = int(b.isna().sum())
    return float("nan"), f"{METHOD_LABEL.get(method, method)} missed it ({missed}/{len(b)} seeds)"


def reduction_figure(w, raw):
    """Small multiples, one panel per task and partition: each method's total upload as a reduction against
    FedAvg-FFT's, with the SA-FedLoRA paper's headline reduction marked (its schedule, not ours: the
    reduction depends on the initiating stage's length, see the claims table)."""
    raw = raw[raw.method != "fedavg_fft"].dropna(subset=["reduction_total"]) if len(raw) else raw
    if raw.empty:
        return
    panels = list(dict.fromkeys(zip(raw["task"], raw["partition"])))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False, sharey=True)
    value, label = MARKS["upload_reduction_vs_fedavg"]
    for ax, (task, part) in zip(axes[0], panels):
        d = raw[(raw.task == task) & (raw.partition == part)]
        methods = methods_present(d)
        vals = [100 * d[d.method == m]["reduction_total"].iloc[0] for m in methods]
        ax.bar(range(len(methods)), vals, color=[method_color(m) for m in methods])
        for x, v in enumerate(vals):
            ax.annotate(f"{v:.1f}%", (x, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(100 * value, color="black", ls="--", lw=0.9, label=label if ax is axes[0][0] else None)
        ax.set_xticks(range(len(methods)), [METHOD_LABEL.get(m, m) for m in methods], rotation=30, ha="right")
        ax.set_ylim(0, 112)
        ax.set_title(f"{task}" + (f", {partition_name(part)}" if part else ""))
    axes[0][0].set_ylabel("upload cut vs FedAvg-FFT (%)")
    fig.legend(loc="lower center", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    w.figure("upload_reduction", fig, "Total upload over the run as a reduction against FedAvg-FFT's (mean over "
             "seeds), per task and partition; dashed: the SA-FedLoRA paper's headline number, reached with its own "
             "schedule (the reduction depends on how many rounds send the full model).")


def family_communication(w, runs, ctx, prof):
    """A view over another family's runs (prof['runs_from']): accuracy vs uploaded bytes per method."""
    src = prof["runs_from"]
    where = src.get("where", {})
    runs = [r for r in load_runs(ctx.root, src["family"], ctx.profile)
            if all(r["meta"]["labels"].get(k) in [str(x) for x in (v if isinstance(v, list) else [v])]
                   for k, v in where.items())]
    df, cv = federation_frame(runs), curve_frame(runs)
    if df.empty:
        return Communication(runs=[], table=pd.DataFrame())
    frac = float(prof.get("target_fraction_of_fft", 0.9))
    rows_all, raw_all = [], []
    for task in sorted(df["task"].unique()):
        dt, ct = df[df.task == task], cv[cv.task == task]
        part_labels = sorted(dt["partition"].unique(), key=partition_key) if "partition" in dt else [None]
        for part in part_labels:
            dp_, cp = (dt[dt.partition == part], ct[ct.partition == part]) if part else (dt, ct)
            a = agg(dp_, ["method"])
            mbf = agg(dp_, ["method"], "cum_up_MB")
            fft = a[a.method == "fedavg_fft"]
            # FedAvg-FFT's final accuracy on the rows the curves score (the whole split unless the runs score a
            # curve subset), so the target is crossed on the rows it was taken from
            fft_last = last_point(cp[cp.method == "fedavg_fft"])
            ref = fft_last["acc"].mean() if len(fft_last) else fft.iloc[0]["mean"] if len(fft) else a["mean"].max()
            target = frac * ref
            bt = bytes_to_target(cp, target)
            fft_mb, fft_missed = mb_to_target(bt, "fedavg_fft")
            fft_total = mbf[mbf.method == "fedavg_fft"]["mean"].iloc[0] if len(fft) else float("nan")
            pname = partition_name(part) if part else ""
            for method in methods_present(a):
                c = a[a.method == method].iloc[0]
                b = bt[bt.method == method]["MB"]
                reached = int(b.notna().sum())
                mb_t, _ = mb_to_target(bt, method)
                total = mbf[mbf.method == method]["mean"].iloc[0]
                red_t = 1 - mb_t / fft_mb if fft_mb == fft_mb and mb_t == mb_t else float("nan")
                red_total = 1 - total / fft_total if fft_total == fft_total else float("nan")
                fftc = fft.iloc[0] if len(fft) else None
                dacc = c["mean"] - fftc["mean"] if fftc is not None else float("nan")
                comparable = fftc is not None and dacc >= -tol(c["std"], fftc["std"])
                rows_all.append({"task": task, "partition": pname, "method": METHOD_LABEL.get(method, method),
                                 "final acc (%)": fmt_pct(c["mean"], c["ci"], c["n"])
                                 + ("" if learned(c["mean"], 1.0 / num_labels(task)) else " (chance)"),
                                 "Δ acc vs FFT": "-" if dacc != dacc
                                 else f"{100 * dacc:+.1f}" + ("" if comparable else " ✗"),
                                 "upload total (MB)": f"{total:.3g}",
                                 f"MB to {100 * target:.1f}%": f"{mb_t:.3g}" if mb_t == mb_t
                                 else f"not reached ({reached}/{len(b)})",
                                 "reduction vs FFT (to target)": f"{100 * red_t:.2f}%" if red_t == red_t
                                 else fft_missed if method != "fedavg_fft" else "-",
                                 "reduction vs FFT (total)": "-" if red_total != red_total
                                 else f"{100 * red_total:.2f}%"})
                raw_all.append(dict(task=task, partition=part, method=method, acc_mean=c["mean"], acc_std=c["std"],
                                    n=c["n"], delta_acc_vs_fft=dacc, comparable=comparable, upload_total_MB=total,
                                    fft_learned=fftc is not None and learned(fftc["mean"], 1.0 / num_labels(task)),
                                    target_acc=target, MB_to_target=mb_t, seeds_reaching_target=reached,
                                    reduction_to_target=red_t, reduction_total=red_total))
            fig, ax = plt.subplots(figsize=(5.6, 3.6))
            for i, method in enumerate(methods_present(a)):
                cm = cp[cp.method == method].groupby("round").agg(acc=("acc", "mean"), sd=("acc", "std"),
                                                                  n=("acc", "count"),
                                                                  mb=("cum_up_MB", "mean")).reset_index()
                half = pd.Series([ci_half(s, n) for s, n in zip(cm["sd"].fillna(0.0), cm["n"])]).fillna(0.0)
                ax.plot(cm["mb"], 100 * cm["acc"], marker="osD^v"[i % 5], ms=3, ls=["-", "--", "-.", ":"][i % 4],
                        color=method_color(method), label=METHOD_LABEL.get(method, method))
                ax.fill_between(cm["mb"], 100 * (cm["acc"] - half), 100 * (cm["acc"] + half),
                                color=method_color(method), alpha=0.15)
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
                     f"{task} {pname}: accuracy vs cumulative uploaded MB (mean over seeds, band = 95% t-interval; "
                     f"none for one seed).")
    reduction_figure(w, pd.DataFrame(raw_all))
    disp = pd.DataFrame(rows_all)
    # one table per target column name clash: normalise the target column
    tcols = [c for c in disp.columns if c.startswith("MB to ")]
    if len(tcols) > 1:
        disp["MB to target"] = disp[tcols].bfill(axis=1).iloc[:, 0]
        disp = disp.drop(columns=tcols)
    w.table("bytes_to_target", disp.set_index(["task", "partition", "method"]), pd.DataFrame(raw_all),
            f"Upload needed to reach {frac:g} x FedAvg-FFT's final accuracy (mean over seeds) and reduction vs "
            f"FedAvg-FFT; ✗ = accuracy not comparable to FFT (below by more than max(2 points, seed std)).")
    return Communication(runs=runs, table=pd.DataFrame(raw_all))
