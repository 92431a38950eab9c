"""results/README.md, the tuning tables and the partition heatmaps."""
import hashlib
import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from scripts.figures.style import COMPARABLE_TOL
from scripts.verdicts import MARGIN


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


CLAIM_COLUMNS = ("id", "paper", "claim", "paper's number", "ours", "verdict",
                 "what differs from the paper's setting")


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_section(claim_rows, profile, root=None):
    """The "Seed-paper claims" table: one row per claim (scripts/figures/claims.py), then its criteria.
    claim_rows: what claims(results) returned (its rows are made here, with the profile and root), or rows."""
    rows = claim_rows.rows(profile, root) if hasattr(claim_rows, "rows") else list(claim_rows)
    by_profile = any(r.profile for r in rows)            # a README over several profiles: say which decided
    columns = CLAIM_COLUMNS[:5] + (("profile",) if by_profile else ()) + CLAIM_COLUMNS[5:]
    lines = ["## Seed-paper claims and what we measured", "",
             "One row per claim of the three seed papers, ids (a)-(k), per task and privacy level or partition "
             "where the claim applies, then the methods family's claims. A row whose runs are not in this "
             "profile says so and names the command that runs them (the profile whose section of "
             "`configs/<family>.yaml` holds them). *paper's number*: as given in `../shared/papers/README.md`, "
             "with its source tag ([abstract], [quoted], [review] of the submitted version, [3rd-party] "
             "reimplementation, [seed summary], [untagged]); \"not reported here\" where that file has no "
             "value. "
             "*ours*: accuracy in points, means with 95% t-intervals over seeds (federations), or the paired "
             "interval of the difference where the verdict is paired by seed. *what differs*: our backbone, "
             "clients, split and rounds beside the paper's."
             + (" *profile*: whose runs give the row; each claim is read from the first profile of "
                f"{' / '.join(dict.fromkeys(r.profile for r in rows))} that ran it." if by_profile else ""), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = (r.id, r.paper, r.claim, r.paper_number, r.ours) + ((r.profile,) if by_profile else ()) + \
            (f"**{r.verdict}**", r.differs)
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    if not rows:
        lines.append("| " + " | ".join(["-", "-", "no claim"] + ["-"] * (len(columns) - 3)) + " |")
    lines += ["", "Criteria. **Paired** (a, b, c, g, h, k): seed s of both arms sees the same partition, clients "
              "and batches; the 95% t-interval of the mean per-seed difference decides (scripts/verdicts.py): "
              f"**reproduced** if it lies above 0, **refuted** if it lies below +{100 * MARGIN:.0f} point, "
              "**underpowered** otherwise, with the number of seeds that would decide at the observed spread. "
              "(c) also needs no step from a larger to a smaller ε to raise the mean by more than the larger seed "
              "std, and is refuted if ε=1 is not below non-private. (d) compares the per-task FFA − FedAvg "
              "intervals unpaired across tasks: reproduced only if MNLI's lies above every other task's. (e) "
              "reproduced iff the adapter bytes (upload minus the head's) halve exactly. (h) SLoRA − (FFT + "
              "LoRA)/2 > 0 paired, i.e. at least half the gap closed, margin 0. (k) accuracy: not below = the "
              f"paired interval lies above −{100 * COMPARABLE_TOL:.0f} points; upload: no round after the "
              "initiating stage uploads more than the one before it. (f), (i), (j): \"comparable\" = accuracy "
              f"not below the reference by more than max({100 * COMPARABLE_TOL:.0f} points, the larger seed std); "
              "(f): a method is insensitive when its accuracy range over α is within max(2 points, the mean seed "
              "std); reproduced iff FFA-LoRA is and FedAvg-LoRA is not, refuted iff FFA-LoRA is not. An unpaired "
              "rule with one seed per arm has no spread to judge by and says **underpowered**. **inconclusive** "
              "names its reason (e.g. an arm at "
              "chance: a comparison of models that did not learn says nothing); **not run** names the command. "
              "Learning rates (and, under DP, clip norms) where a run says `tuned` were chosen on a dev split "
              "held out from the training rows, never on the reported split; tuning a private run on the "
              "clients' data spends privacy that the reported ε does not count, as in most DP papers.", ""]
    return lines


def profile_minutes(root, profile):
    """['Measured wall time of the profile: N min in all (family M, ...) ...', ''] from each family's
    timing.json (what scripts.reproduce measured: runs, tuning passes, setup and tokenization), or []."""
    per = {}
    for path in sorted(Path(root).glob(f"*/{profile}/timing.json")):
        try:
            per[path.parent.parent.name] = float(json.loads(path.read_text())["wall_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not per:
        return []
    parts = ", ".join(f"{fam} {secs / 60:.1f}" for fam, secs in sorted(per.items(), key=lambda kv: -kv[1]))
    return [f"**Measured wall time of the {profile} profile: {sum(per.values()) / 60:.1f} min in all** ({parts} "
            f"min; every run and tuning pass with its setup and tokenization, on the machine each family's "
            f"`Produced on` line names; from `<family>/{profile}/timing.json`).", ""]


def write_readme(root, profile, sections, claim_rows, heatmaps, notes_by_family, decides=None):
    """results/README.md. profile: one profile name, or (with decides, {family: the profile whose section is
    shown}) the profiles a combined README covers, in the order that decides."""
    root = Path(root)
    profiles = [profile] if isinstance(profile, str) else list(profile)
    if decides is None:
        what = (f"the saved runs of profile **{profile}** under `{profile}` subdirectories")
    else:
        what = (f"the saved runs of the profiles {' and '.join(f'**{p}**' for p in profiles)} (each family's "
                f"section from the first of them, in that order, that holds its runs; each claim from the first "
                f"that ran it)")
    lines = ["# Results", "",
             f"Generated by `python -m scripts.figures` (called by `make reproduce`) from {what}; rebuild with "
             f"`make figures` (no training). "
             f"It opens with each seed-paper claim beside our number and verdict (a claim whose runs this profile "
             f"lacks says so, with the command that runs them), then each family's tables and figures.", "",
             *[line for p in profiles for line in profile_minutes(root, p)],
             "Accuracy is the global model's final accuracy on the task's evaluation split (MNLI: "
             "validation_matched, SST-2/RTE: validation, 20 Newsgroups: test). Tables and figures give the "
             "mean over seeds with the half-width of its 95% t-interval (each seed is an independent federation "
             "trained in the same batched pass; a single seed shows its value and `(1 seed)`, and its figure "
             "has no bar). `(chance)` marks cells within 5 points of chance level: "
             "those runs did not learn and say nothing about the methods. `≈` marks differences smaller than the "
             "seed spread (the larger of the two std); `†` marks the best method of a column or one within the "
             "seed spread of it.", ""]
    lines += claims_section(claim_rows, profiles[0], root)
    lines.append(DEVIATIONS)
    for fam, (setting, status_lines, prov, items) in sections.items():
        lines += [f"## {fam}" + (f" ({decides[fam]} profile)" if decides else ""), ""]
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
        configured = record.get("grid_configured", record["grid"])
        for row in record["table"]:
            point = {k: row[k] for k in keys}
            acc = row["dev_accuracy"]
            added = any(v not in configured.get(k, [v]) for k, v in point.items())     # an extension's point
            rows.append({"run": ", ".join(names), **{k: f"{v:g}" for k, v in point.items()},
                         "point": "extension" if added else "grid",
                         "dev accuracy (%)": "-" if acc is None else f"{100 * acc:.1f}"
                         + (" ← chosen" if point == record["chosen"] else "")
                         + (" (edge of the grid: the best may lie beyond)" if point == record["chosen"] and any(
                             len(record["grid"][k]) > 1 and v in (min(record["grid"][k]), max(record["grid"][k]))
                             for k, v in point.items()) else ""),
                         "tuning seeds": ",".join(map(str, record["seeds"])),
                         "scored on": record.get("score", "dev")})
            raw.append({"run": ", ".join(names), **point, "dev_accuracy": acc, "chosen": point == record["chosen"],
                        "extension": added, "limit_reached": bool(record.get("limit_reached")),
                        "seeds": record["seeds"], "dev_fraction": record["dev_fraction"],
                        "score": record.get("score", "dev")})
    if rows:
        table = pd.DataFrame(rows).set_index("run")
        personal = (table["scored on"] != "dev").any()
        if not personal:                         # every pass scored on the dev split: the caption says so
            table = table.drop(columns="scored on")
        w.table("tuning", table, pd.DataFrame(raw),
                "Tuning: each grid point's mean final accuracy on the dev split (training rows held out from every "
                "client), run as federations of one pass; `extension` = a point added beyond an edge choice "
                "(tune.extend); the runs named use the chosen point on all their rows."
                + (" `scored on` personal: a personalized method's passes score each client's own model on rows "
                   "held out of its data in the tuning pass (its own partition, not the reported run's), the "
                   "accuracy it reports." if personal else ""))
        tuning_figure(w, pd.DataFrame(raw))


def tuning_figure(w, raw):
    """Every tuning pass's curve, one small panel each: dev accuracy against the (single, numeric) tuned key on
    a log axis, the grid's points filled, extensions hollow, the choice starred."""
    keys = [k for k in raw.columns if k not in ("run", "dev_accuracy", "chosen", "extension", "limit_reached",
                                                "seeds", "dev_fraction", "score")]
    if len(keys) != 1 or not pd.api.types.is_numeric_dtype(raw[keys[0]]):
        return                                   # several keys or a categorical one: the table says it all
    key, groups = keys[0], list(raw.groupby("run", sort=True))
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.9 * cols, 2.3 * nrows), squeeze=False, sharey=True)
    for ax, (run, g) in zip(axes.flat, groups):
        g = g.sort_values(key)
        acc = 100 * g["dev_accuracy"].astype(float)
        ax.plot(g[key], acc, color="C0", lw=1)
        grid, ext = ~g["extension"].astype(bool), g["extension"].astype(bool)
        ax.plot(g[key][grid], acc[grid], "o", color="C0", ms=4, label="grid")
        ax.plot(g[key][ext], acc[ext], "o", mfc="white", color="C0", ms=5, label="extension")
        best = g["chosen"].astype(bool)
        ax.plot(g[key][best], acc[best], "*", color="C3", ms=11, label="chosen")
        ax.set_xscale("log")
        ax.set_xticks(list(g[key]), [f"{v:g}" for v in g[key]], fontsize=6)     # the values run, nothing else
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(run if len(run) <= 34 else run[:32] + "…", fontsize=7)
        ax.set_xlabel(key, fontsize=7)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("dev accuracy (%)")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    w.figure("tuning", fig, f"Tuning curves: dev accuracy against {key} for every tuned run (one tuning seed "
             f"unless the table says otherwise); hollow = a point added beyond an edge choice, star = the choice.")
