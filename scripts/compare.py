"""Compare regenerated results with the committed ones, cell by cell.

    python -m scripts.compare COMMITTED_ROOT REGENERATED_ROOT [--profile quick]

A cell is one federation's final accuracy on the task's reported split: (family, run, seed, sweep
variant). Each regenerated cell is set beside the committed one and called
    identical      the same number (same code and kind of machine: expected),
    within noise   |difference| <= 2 x the committed seed spread of its run and variant (the sample std
                   over seeds; another machine rounds differently and training amplifies it),
    differs        anything else, or a cell that exists on one side only.
Writes REGENERATED_ROOT/COMPARISON.md and returns the table; `make reproduce` calls it at the end.
"""
import argparse
import sys
from pathlib import Path

import pandas as pd

from scripts.families import FAMILIES
from scripts.figures.load import federation_frame, load_runs

NOISE_FACTOR = 2.0


def cells(root, profile):
    """One row per finished federation of every family: family, run, seed, variant, acc."""
    frames = []
    for family in FAMILIES:
        df = federation_frame(load_runs(root, family, profile))
        if not df.empty:
            frames.append(df.assign(family=family)[["family", "run", "seed", "variant", "acc"]])
    return pd.concat(frames, ignore_index=True) if frames else \
        pd.DataFrame(columns=["family", "run", "seed", "variant", "acc"])


def compare(committed_root, regenerated_root, profile):
    old, new = cells(committed_root, profile), cells(regenerated_root, profile)
    spread = old.groupby(["family", "run", "variant"])["acc"].std().fillna(0.0).rename("seed_std")
    key = ["family", "run", "seed", "variant"]
    t = old.merge(new, on=key, how="outer", suffixes=("_committed", "_regenerated"))
    t = t.merge(spread.reset_index(), on=["family", "run", "variant"], how="left")
    t["delta"] = t["acc_regenerated"] - t["acc_committed"]

    def call(row):
        if pd.isna(row["acc_committed"]) or pd.isna(row["acc_regenerated"]):
            return "differs (only " + ("regenerated" if pd.isna(row["acc_committed"]) else "committed") + ")"
        if row["acc_committed"] == row["acc_regenerated"]:
            return "identical"
        return "within noise" if abs(row["delta"]) <= NOISE_FACTOR * row["seed_std"] else "differs"
    t["outcome"] = [call(r) for r in t.to_dict("records")] if len(t) else []
    return t.sort_values(key).reset_index(drop=True)


def write(table, out, profile):
    counts = table["outcome"].value_counts().to_dict() if len(table) else {}
    lines = [f"# Regenerated vs committed results (profile {profile})", "",
             f"{len(table)} cells: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none") + ".",
             "", f"A cell is one federation's final accuracy on the reported split. `within noise`: |Δ| at most "
             f"{NOISE_FACTOR:g} x the committed seed std of its run and variant. Written by scripts/compare.py.", "",
             "| family | run | seed | variant | committed | regenerated | Δ (points) | outcome |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda x: "-" if pd.isna(x) else f"{100 * x:.2f}"  # noqa: E731
    for r in table.to_dict("records"):
        lines.append(f"| {r['family']} | {r['run']} | {r['seed']} | {r['variant'] or '-'} | {pct(r['acc_committed'])} | "
                     f"{pct(r['acc_regenerated'])} | {pct(r['delta'])} | {r['outcome']} |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("committed")
    ap.add_argument("regenerated")
    ap.add_argument("--profile", default="quick")
    args = ap.parse_args(argv)
    table = compare(args.committed, args.regenerated, args.profile)
    counts = write(table, Path(args.regenerated) / "COMPARISON.md", args.profile)
    print(f"compare: {len(table)} cells vs {args.committed}: {counts} -> {Path(args.regenerated) / 'COMPARISON.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
