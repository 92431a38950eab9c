"""Tables, figures and results/README.md from saved runs only (no training).

    python -m scripts.figures [--profile quick|standard|paper|smoke] [--results DIR]

Without --profile, where several of paper / standard / quick are saved, results/README.md covers them all:
each family's section from the first of them (that order) with runs, each claim from the first that ran it.

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
from scripts.figures.claims import claims, merge_claims
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


# Which profile decides a family where several are saved: the first here whose runs of it rendered anything.
PRECEDENCE = ("paper", "standard", "quick")


def render(root, profile, fam_docs):
    """Every family's tables and figures of one profile under <root>/<family>/<profile>/: (sections, notes,
    claims, heatmaps), what write_readme takes."""
    root = Path(root)
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
    return sections, notes, claims(ctx.results), heat


def build(root, profile, families=None):
    """results/README.md of one profile."""
    fam_docs = load_families(families) if families else load_families()
    sections, notes, claim_rows, heat = render(root, profile, fam_docs)
    write_readme(root, profile, sections, claim_rows, heat, notes)
    return sections


def build_combined(root, profiles, families=None):
    """results/README.md over several profiles (PRECEDENCE order): each family's section from the first
    profile whose runs of it rendered anything (the other profiles' tables stay in <family>/<profile>/), each
    claim's row from the first profile that ran it, every row naming its profile."""
    root = Path(root)
    fam_docs = load_families(families) if families else load_families()
    rendered = {p: render(root, p, fam_docs) for p in profiles}
    decides, sections, notes = {}, {}, {}
    for fam in dict.fromkeys(f for p in profiles for f in rendered[p][0]):       # a view may render in one only
        have = [p for p in profiles if fam in rendered[p][0]]                   # profiles with a section
        shown = [p for p in have if rendered[p][0][fam][3]]                      # ... that rendered anything
        decides[fam] = shown[0] if shown else have[-1]
        setting, status, prov, items = rendered[decides[fam]][0][fam]
        others = [p for p in shown if p != decides[fam]]
        status = list(status) + [f"the {p} profile's tables and figures: `{fam}/{p}/`" for p in others]
        sections[fam] = (setting, status, prov, items)
        notes[fam] = rendered[decides[fam]][1][fam]
    rows = merge_claims({p: rendered[p][2].rows(p, root, families) for p in profiles}, profiles)
    heat = sorted({h for p in profiles for h in rendered[p][3]})
    write_readme(root, profiles, sections, rows, heat, notes, decides)
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
    present = available_profiles(root)
    several = [p for p in PRECEDENCE if p in present]
    if not profile and len(several) > 1:        # e.g. standard and quick: one README, each claim where decided
        sections = build_combined(root, several, args.configs)
        profile = " + ".join(several)
    else:
        if not profile:
            profile = present[0] if len(present) == 1 else detect_profile()
        sections = build(root, profile, args.configs)
    print(f"figures: profile {profile}, {sum(len(s[3]) for s in sections.values())} tables/figures in "
          f"{len(sections)} families -> {root / 'README.md'}")
    return 0
