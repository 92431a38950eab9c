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

The package: load.py (saved runs -> frames), style.py (formatting, comparability rules, the Writer),
families/ (one module per experiment family, registered by name), claims.py (each seed paper's claim and
its verdict), readme.py (results/README.md, tuning tables, partition heatmaps). Which runs a family holds
is scripts/families.py.
"""
import argparse
from pathlib import Path

from scripts.figures import style  # noqa: F401  (first: matplotlib's backend and reproducible PDF dates)
from scripts.families import FAMILIES, PROFILES, detect_profile, expand, load_families, results_root
from scripts.figures.claims import claims
from scripts.figures.families import RENDER, family_communication
from scripts.figures.load import load_runs, provenance, setting_line, status_line
from scripts.figures.readme import partition_heatmaps, tuning_table, write_readme
from scripts.figures.results import Context
from scripts.figures.style import Writer, clean_outputs


def available_profiles(root):
    root = Path(root)
    found = set()
    for fam in FAMILIES:
        for p in PROFILES:
            if (root / fam / p).is_dir():
                found.add(p)
    return [p for p in PROFILES if p in found]


def measured_minutes(path):
    """The family's measured wall time from the timing.json that scripts.reproduce writes (runs and tuning
    passes, setup and tokenization included), or None without one."""
    import json
    try:
        t = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    runs = t.get("runs", {})
    missing = t.get("runs_without_wall_s") or 0
    return (f"Measured wall time: {t['wall_s'] / 60:.1f} min on the machine in `Produced on` ({len(runs)} runs "
            f"with their tuning passes, setup and tokenization included; scripts.reproduce's timing.json)"
            + (f"; {missing} run(s) without a measurement" if missing else ""))


def build(root, profile, families=None):
    root = Path(root)
    fam_docs = load_families(families) if families else load_families()
    ctx = Context(root, profile)
    sections, notes, all_runs = {}, {}, []
    for fam in [f for f in FAMILIES if f in fam_docs] + [f for f in fam_docs if f not in FAMILIES]:
        if profile not in fam_docs[fam].get("profiles", {}):
            others = ", ".join(fam_docs[fam].get("profiles", {}))
            sections[fam] = ("", [f"not part of the {profile} profile (profiles: {others}; "
                                  f"configs/{Path(fam_docs[fam]['_path']).name})"], [], [])
            notes[fam] = [fam_docs[fam].get("title", "")]
            continue
        prof = fam_docs[fam]["profiles"][profile]
        w = Writer(root, fam, profile)
        clean_outputs(w.out)
        runs = load_runs(root, fam, profile)
        all_runs += runs
        notes[fam] = [fam_docs[fam].get("title", "")] + list(prof.get("notes", []))
        if "runs_from" in prof:
            view = ctx.results[fam] = family_communication(w, runs, ctx, prof)
            if not w.items:
                continue
            sections[fam] = (setting_line(view.runs), [], provenance(view.runs), w.items)
            continue
        if not runs:
            sections[fam] = ("", [f"no run of the {profile} profile is saved yet: `python -m scripts.reproduce "
                                  f"--profile {profile} --only {fam}` runs it"], [], [])
            continue
        if fam in RENDER:
            ctx.results[fam] = RENDER[fam](w, runs, ctx)
        tuning_table(w, runs, root)
        bad = [status_line(r) for r in runs if r["summary"].get("status") != "finished"]
        planned = [spec["name"] for spec in expand(fam_docs[fam], profile)] if profile in fam_docs[fam].get(
            "profiles", {}) else []
        absent = [f"run `{n}`: not run yet" for n in planned if n not in {r["name"] for r in runs}]
        status = [f"{len(runs) - len(bad)} of {max(len(runs), len(planned))} runs finished"] + bad + absent
        minutes = measured_minutes(w.out / "timing.json")
        if minutes:
            status.append(minutes)
        sections[fam] = (setting_line(runs), status, provenance(runs), w.items)
    heat = partition_heatmaps(root, profile, all_runs)
    write_readme(root, profile, sections, claims(ctx.results), heat, notes)
    return sections


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, help="default: the only profile present, else the one "
                    "reproduce would pick ($PROFILE, paper with CUDA, quick)")
    ap.add_argument("--results", help="results root (default: $FEDSIM_RESULTS or results/)")
    ap.add_argument("--configs", help="directory of family YAML files (default configs/)")
    args = ap.parse_args(argv)
    root = results_root(args.results)
    profile = args.profile
    if not profile:
        present = available_profiles(root)
        profile = present[0] if len(present) == 1 else detect_profile()
    sections = build(root, profile, args.configs)
    print(f"figures: profile {profile}, {sum(len(s[3]) for s in sections.values())} tables/figures in "
          f"{len(sections)} families -> {root / 'README.md'}")
    return 0
