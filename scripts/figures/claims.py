"""Each seed paper's claim beside what the runs measured: one row per claim, per task and privacy level or
partition where that applies, never omitted, then the methods family's claims.

    rows = claims(ctx.results).rows(profile, root)          # readme.write_readme does this

claims(results) holds the families' typed results (scripts/figures/results.py, keyed by family name); the rows
also need the profile (a row whose runs are absent says "not run in the <profile> profile" and names the
command that runs them, from the profile sections of configs/<family>.yaml) and the results root (run
configs, per-round upload ledgers and accuracy curves), which build hands to write_readme. Without a root the
rows that need run files say so.

Ids: FFA-LoRA (a) FFA >= FedAvg-LoRA without DP, (b) under DP per ε, (c) DP lowers both, (d) the gap is largest
on MNLI, (e) exactly half the adapter upload, (f) insensitive to LoRA α; SLoRA (g) the LoRA-FFT gap widens with
skew, (h) SLoRA closes most of it, (i) stage-1 density; SA-FedLoRA (j) fewer communicated parameters than
FedAvg-FFT, (k) accuracy not below FedAvg-FFT / fixed-rank LoRA, upload non-increasing while annealing.
Verdicts: reproduced / refuted / underpowered (with the seeds that would decide, scripts/verdicts.py) /
inconclusive (with the reason) / not run.
"""
import copy
import json
import math
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path

import pandas as pd

from fedsim import config as C
from scripts.families import PROFILES, expand, load_families, required
from scripts.figures import papers
from scripts.figures.families.heterogeneity import PEFT_METHOD
from scripts.figures.families.sweeps import tuned_per_alpha
from scripts.figures.load import (CLIP_ONLY_LABEL, MB, agg, ci_half, curve_frame, federation_frame, last_point,
                                  load_runs, num_labels, per_seed, privacy_label)
from scripts.figures.style import COMPARABLE_TOL, learned, partition_key, partition_name, tol
from scripts.verdicts import paired_verdict

EPSILONS = ("ε=6", "ε=3", "ε=1")                        # the FFA-LoRA paper's private levels, largest first
# An unpaired rule judges a difference against the seed spread; with one seed per arm there is none.
ONE_SEED = "underpowered (one seed per arm: no seed spread to judge the difference by; 5 seeds would decide)"
DP_LEVELS = ("non-private", CLIP_ONLY_LABEL) + EPSILONS   # (c)'s sequence
DENSITIES = (0.005, 0.01, 0.05)                         # (i): SLoRA's stage-1 densities
SA_READINGS = ("sa_fedlora", "sa_fedlora_full")         # SA-FedLoRA's initiating stage: LoRA + head | dense
MOST_SKEWED_TASK = "mnli"                               # (d): 3 classes, the strongest heterogeneity
ANY = "any"             # a task / partition / privacy level no run or config names: the claim's row still stands


def _is(want, value):
    return want == ANY or value == want


def _pname(part):
    return "any partition" if part == ANY else partition_name(part)


@dataclass(frozen=True)
class ClaimRow:
    id: str                 # the claim's id: a ... k, or the methods family's method label
    paper: str              # "FFA-LoRA (arXiv 2403.12313)"
    claim: str              # what is claimed, for which task / level / partition
    paper_number: str       # the paper's number or ordering, each with its source tag (scripts/figures/papers.py)
    ours: str               # our numbers: means with 95% t-intervals, or the paired interval of a paired verdict
    verdict: str
    differs: str            # our setting beside the paper's: backbone, clients, split, rounds
    family: str             # the family whose runs decide it
    profile: str = ""       # the profile whose runs decided it (set where a README covers several profiles)


class Claims:
    """The typed results of one build; rows() turns them into the claims table."""

    def __init__(self, results):
        self.results = results or {}

    def rows(self, profile, root=None, configs=None):
        """[ClaimRow]: (a) ... (k) in order, then the methods family's claims. configs: the directory of
        family YAML files (default configs/)."""
        return _Rows(self.results, profile, root, configs).all()


def claims(results):
    return Claims(results)


CLAIM_IDS = "abcdefghijk"


def merge_claims(rows_by_profile, profiles):
    """One row per claim (id and claim text) over several profiles: the row of the first profile in
    `profiles` whose verdict is not "not run", else the first profile's "not run" row; each row names its
    profile. Rows keep the claims' order: (a) ... (k), then the methods family's in first appearance."""
    merged, order = {}, []
    for p in profiles:
        for r in rows_by_profile.get(p, []):
            key = (r.id, r.claim)
            if key not in merged:
                merged[key] = replace(r, profile=p)
                order.append(key)
            elif merged[key].verdict == "not run" and r.verdict != "not run":
                merged[key] = replace(r, profile=p)
    first = {k[0]: i for i, k in reversed(list(enumerate(order)))}
    rank = {k: (CLAIM_IDS.index(k[0]) if k[0] in CLAIM_IDS else len(CLAIM_IDS) + first[k[0]], i)
            for i, k in enumerate(order)}
    return [merged[k] for k in sorted(order, key=rank.get)]


# ----------------------------------------------------------------------------- numbers and their text

def _mean(arm):
    return sum(arm.values()) / len(arm)


def _sd(values):
    v = list(values)
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _half(sd, n):
    """Half-width of the 95% t-interval of a mean of n values (nan for one)."""
    return ci_half(sd, n)


def _fmt_cell(mean, sd, n):
    """'76.1 [73.9, 78.3] (3 seeds)' in accuracy points: the mean and its 95% t-interval over seeds."""
    h = _half(sd, int(n))
    ci = "no interval" if math.isnan(h) else f"[{100 * (mean - h):.1f}, {100 * (mean + h):.1f}]"
    return f"{100 * mean:.1f} {ci} ({int(n)} seed{'s' if n != 1 else ''})"


def _fmt_mean(arm):
    return _fmt_cell(_mean(arm), _sd(arm.values()), len(arm))


def _fmt_paired(v):
    ci = "no interval" if math.isnan(v.low) else f"95% CI [{100 * v.low:+.1f}, {100 * v.high:+.1f}]"
    return f"Δ {100 * v.mean:+.1f} points, {ci}, {v.n} paired seed{'s' if v.n != 1 else ''}"


def _word(v):
    """A paired verdict's word, with the seeds that would decide when underpowered."""
    if v.verdict != "underpowered":
        return v.verdict
    if v.seeds_needed:
        return f"underpowered (≈{v.seeds_needed} seeds would decide)"
    return "underpowered (no seed count up to 1000 would decide at this spread)"


def _noninferior(a, b, delta=COMPARABLE_TOL):
    """Paired verdict on "a is not below b by more than delta": reproduced if the 95% interval of a - b lies above
    -delta, refuted if it lies below -delta, underpowered otherwise. The interval reported is of a - b."""
    shifted = paired_verdict({s: x + delta for s, x in a.items()}, b, margin=0.0)
    return replace(shifted, mean=shifted.mean - delta, low=shifted.low - delta, high=shifted.high - delta)


def _chance(task):
    try:
        return 1.0 / num_labels(task)
    except Exception:          # a task fedsim does not know: no chance check
        return None


def _dead(task, *arms):
    """Every arm at chance (within 5 points of it): the comparison says nothing."""
    ch = _chance(task)
    return ch is not None and not any(learned(_mean(a), ch) for a in arms if a)


def _mb(x):
    return f"{x / MB:.4g} MB"


def _arm(df, **where):
    if df is None or df.empty or any(k not in df for k in where):
        return {}
    return per_seed(df, **where)


def _reading(name, init_stage=None):
    """SA-FedLoRA's two readings by their method label (fedavg_lora etc. unchanged)."""
    return "sa_fedlora_full" if name == "sa_fedlora" and init_stage == "full" else name


def _readings(df):
    """df with SA-FedLoRA's full-model reading labelled sa_fedlora_full (a no-op once load labels it so)."""
    if df is None or df.empty or "method.init_stage" not in df:
        return df
    df = df.copy()
    df["method"] = [_reading(m, s) for m, s in zip(df["method"], df["method.init_stage"])]
    return df


# ----------------------------------------------------------------------------- settings (the last column)

def _split(part):
    part = dict(part or {})
    name = part.get("name")
    if name == "iid":
        return "IID"
    if name == "dirichlet":
        return f"Dirichlet α={float(part.get('alpha', 0.5)):g}"
    return str(name)


def _differs(paper, cfgs):
    """One phrase: our backbone, clients, split and rounds beside the paper's (each with its tag)."""
    cfgs = [c for c in cfgs if c]
    if not cfgs:
        return "our setting unknown (no run or config)"

    def ours(f):
        return "/".join(dict.fromkeys(f(c) for c in cfgs))

    from fedsim.sampling import clients_per_round
    backbone = ours(lambda c: str(c.get("model")) + (f" ({c['num_hidden_layers']} layers)"
                                                     if c.get("num_hidden_layers") else ""))
    clients = ours(lambda c: f"{c['num_clients']}" + (
        f" ({clients_per_round(c['num_clients'], c['client_fraction'])} per round)"
        if c.get("client_fraction", 1.0) < 1 else ""))
    s = paper.setting
    return (f"backbone {backbone} vs {s.get('backbone', papers.UNKNOWN)}; clients {clients} vs "
            f"{s.get('clients', papers.UNKNOWN)}; split {ours(lambda c: _split(c.get('partition')))} vs "
            f"{s.get('split', papers.UNKNOWN)}; rounds {ours(lambda c: str(c.get('rounds')))} vs "
            f"{s.get('rounds', papers.UNKNOWN)}")


def _spec_info(family, spec):
    """A run spec of scripts.families.expand as what the claims match on: its family, name, labels, task,
    method label (SA-FedLoRA's reading), method params, partition label, privacy levels, tune block, config
    (DEFAULTS with its overrides, not validated)."""
    cfg = copy.deepcopy(C.DEFAULTS)
    try:
        C._merge(cfg, copy.deepcopy(spec["overrides"]))
    except (ValueError, KeyError, TypeError):
        pass
    eps = (cfg.get("sweep") or {}).get("dp.epsilon")
    levels = {privacy_label(e) for e in eps} if eps else {privacy_label((cfg.get("dp") or {}).get("epsilon"))}
    method = dict(cfg.get("method") or {})
    labels = spec.get("labels", {})
    return dict(family=family, name=spec["name"], labels=labels, task=cfg.get("task"),
                method=labels.get("method") or _reading(method.get("name"), method.get("init_stage")),
                params=method, partition=labels.get("partition"), levels=levels, tune=spec.get("tune"), cfg=cfg)


# ----------------------------------------------------------------------------- the rows

class _Rows:
    def __init__(self, results, profile, root, configs):
        self.r, self.profile = results, profile
        self.root = Path(root) if root is not None else None
        self.families = load_families(configs) if configs else load_families()
        self._runs, self._specs = {}, {}
        ffa = results.get("ffa_table")
        self.ffa = ffa.seeds if ffa is not None and ffa.seeds is not None and len(ffa.seeds) else None
        het = results.get("heterogeneity")
        seeds = het.seeds if het is not None and het.seeds is not None and len(het.seeds) else None
        if seeds is None and self.runs("heterogeneity"):
            seeds = federation_frame(self.runs("heterogeneity"))       # e.g. only the communication view ran
            seeds = seeds if len(seeds) else None
        self.het = _readings(seeds)

    def all(self):
        out = []
        for make in (self.a, self.b, self.c, self.d, self.e, self.f, self.g, self.h, self.i, self.j, self.k):
            out += make()
        return out + self.methods()

    # --- runs, specs and the "not run" text

    def runs(self, fam):
        if fam not in self._runs:
            self._runs[fam] = load_runs(self.root, fam, self.profile) if self.root is not None else []
        return self._runs[fam]

    def run(self, fam, name):
        return next((r for r in self.runs(fam) if r["name"] == name), None)

    def profiles_of(self, fam):
        """The profiles of configs/<fam>.yaml a row may point to: the smoke profile (numbers that mean nothing)
        only when it is the one rendered."""
        doc = self.families.get(fam)
        have = [p for p in (doc or {}).get("profiles") or {} if p != "smoke" or self.profile == "smoke"]
        return [p for p in PROFILES if p in have] + [p for p in have if p not in PROFILES]

    def specs(self, fam, profile):
        """Specs of fam's section for profile: its own runs, then those it reads from other families."""
        if (fam, profile) not in self._specs:
            doc, out = self.families.get(fam), []
            if doc is not None and profile in (doc.get("profiles") or {}):
                out = [_spec_info(fam, s) for s in expand(doc, profile)]
                try:
                    for other, names in required(doc, profile, self.families).items():
                        out += [_spec_info(other, s) for s in expand(self.families[other], profile)
                                if s["name"] in names]
                except (KeyError, ValueError):
                    pass
            self._specs[(fam, profile)] = out
        return self._specs[(fam, profile)]

    def universe(self, fam, key, data=(), where=lambda s: True, everywhere=False):
        """Values of `key` a claim enumerates: those in the runs (data) and in fam's specs for this profile
        (every profile's when this one has none, or always with everywhere), so a row is never dropped for
        want of runs."""
        mine = {s[key] for s in self.specs(fam, self.profile) if s["family"] == fam and where(s)}
        if not mine or everywhere:
            mine = {s[key] for p in self.profiles_of(fam) for s in self.specs(fam, p)
                    if s["family"] == fam and where(s)}
        return {v for v in set(data) | mine if v is not None}

    def not_run(self, fam, match, what):
        """(text, config) of a row whose runs are absent: the profiles whose section of configs/<fam>.yaml
        holds a matching run and the command that runs it."""
        doc = self.families.get(fam)
        path = f"configs/{Path(doc['_path']).name}" if doc else f"configs/{fam}.yaml (absent)"
        held = [p for p in self.profiles_of(fam) if any(match(s) for s in self.specs(fam, p))]

        def cmd(p):
            return f"`python -m scripts.reproduce --profile {p} --only {fam}`"
        text = f"not run in the {self.profile} profile ({what})"
        if self.profile in held:
            text += f"; {cmd(self.profile)} runs it"
        elif held and self.profile not in ((doc or {}).get("profiles") or {}):
            text += f"; {path} has no {self.profile} section: {' or '.join(map(cmd, held))} runs it"
        elif held:
            text += (f"; the {self.profile} section of {path} does not hold it: "
                     f"{' or '.join(map(cmd, held))} runs it")
        else:
            text += f"; no profile of {path} holds it"
        use = [self.profile] if self.profile in held else held
        spec = next((s for p in use for s in self.specs(fam, p) if match(s)), None)
        return text, spec["cfg"] if spec else None

    def cfgs(self, fam, names, match=None):
        """Configs of the named runs of fam, else of the specs matching `match` (for the last column)."""
        got = [r["cfg"] for n in dict.fromkeys(names) for r in [self.run(fam, n)] if r and r["cfg"]]
        if got or match is None:
            return got
        for p in [self.profile] + self.profiles_of(fam):
            got = [s["cfg"] for s in self.specs(fam, p) if match(s)]
            if got:
                return got[:1]
        return []

    def row(self, cid, paper, claim, ours, verdict, cfgs, fam):
        return ClaimRow(cid, paper.label, claim, papers.paper_number(paper, cid), ours, verdict,
                        _differs(paper, cfgs), fam)

    def missing(self, cid, paper, claim, fam, match, what, fallback=()):
        """A "not run" row; its last column from the config that would run it, else from `fallback` configs
        (the runs beside it)."""
        text, cfg = self.not_run(fam, match, what)
        return self.row(cid, paper, claim, text, "not run", [cfg] if cfg else list(fallback), fam)

    # --- FFA-LoRA: the ffa_table family

    def ffa_tasks(self):
        data = set(self.ffa["task"]) if self.ffa is not None else set()
        return sorted(self.universe("ffa_table", "task", data, everywhere=True)) or [ANY]

    def ffa_runs(self, task, levels, methods=("ffa_lora", "fedavg_lora")):
        if self.ffa is None or "run" not in self.ffa:
            return []
        sel = self.ffa[(self.ffa.task == task) & self.ffa.privacy.isin(levels) & self.ffa.method.isin(methods)]
        return sorted(set(sel["run"]))

    def ffa_match(self, task, methods, levels):
        return lambda s: (s["family"] == "ffa_table" and _is(task, s["task"]) and s["method"] in methods
                          and bool(s["levels"] & set(levels)))

    def ffa_pair(self, cid, task, level, claim):
        f, g = (_arm(self.ffa, task=task, method=m, privacy=level) for m in ("ffa_lora", "fedavg_lora"))
        claim = f"{claim}: {task}, {level}"
        lacking = [m for m, arm in (("ffa_lora", f), ("fedavg_lora", g)) if not arm]
        match = self.ffa_match(task, lacking or ["ffa_lora", "fedavg_lora"], [level])
        if lacking:
            return self.missing(cid, papers.FFA, claim, "ffa_table", match, f"{' and '.join(lacking)} at {level}")
        cfgs = self.cfgs("ffa_table", self.ffa_runs(task, [level]), match)
        if not set(f) & set(g):
            return self.row(cid, papers.FFA, claim, f"FFA {_fmt_mean(f)} vs FedAvg {_fmt_mean(g)}",
                            "inconclusive (no seed in both arms)", cfgs, "ffa_table")
        v = paired_verdict(f, g)
        ours = f"FFA {_fmt_mean(f)} vs FedAvg {_fmt_mean(g)}; FFA − FedAvg {_fmt_paired(v)}"
        head = _arm(self.ffa, task=task, method="head_only", privacy=level)
        if head:
            ours += f"; head only {_fmt_mean(head)}"
        verdict = "inconclusive (both at chance)" if _dead(task, f, g) else _word(v)
        return self.row(cid, papers.FFA, claim, ours, verdict, cfgs, "ffa_table")

    def a(self):
        return [self.ffa_pair("a", t, "non-private", "FFA-LoRA ≥ FedAvg-LoRA without DP (paired by seed)")
                for t in self.ffa_tasks()]

    def b(self):
        return [self.ffa_pair("b", t, e, "FFA-LoRA ≥ FedAvg-LoRA under DP (paired by seed)")
                for t in self.ffa_tasks() for e in EPSILONS]

    def c(self):
        out = []
        for task in self.ffa_tasks():
            for method in ("fedavg_lora", "ffa_lora"):
                claim = (f"DP lowers accuracy, non-increasing from non-private (and σ=0) to ε=6, 3, 1: "
                         f"{task}, {method}")
                arms = {lev: _arm(self.ffa, task=task, method=method, privacy=lev) for lev in DP_LEVELS}
                seq = " → ".join(f"{lev} {_fmt_mean(a)}" if a else f"{lev} not run" for lev, a in arms.items())
                lacking = [lev for lev in ("non-private", "ε=1") if not arms[lev]]
                match = self.ffa_match(task, [method], lacking or DP_LEVELS)
                if lacking:
                    text, cfg = self.not_run("ffa_table", match, f"{method} at {' and '.join(lacking)}")
                    out.append(self.row("c", papers.FFA, claim, f"{seq}. {text}", "not run", [cfg], "ffa_table"))
                    continue
                v = paired_verdict(arms["non-private"], arms["ε=1"])
                private = [lev for lev in DP_LEVELS[1:] if arms[lev]]
                rises = []
                for x, y in zip(private, private[1:]):
                    rise = _mean(arms[y]) - _mean(arms[x])
                    spread = max(_sd(arms[x].values()), _sd(arms[y].values()))
                    if rise > spread:
                        rises.append(f"{x} → {y} rises {100 * rise:+.1f} points, more than the larger seed std "
                                     f"{100 * spread:.1f}")
                if _dead(task, arms["non-private"]):
                    verdict = "inconclusive (non-private arm at chance)"
                elif v.verdict != "reproduced":
                    verdict = _word(v)
                else:
                    verdict = "inconclusive (" + "; ".join(rises) + ")" if rises else "reproduced"
                ours = f"{seq}; non-private − ε=1 {_fmt_paired(v)}"
                if arms[CLIP_ONLY_LABEL]:
                    s0 = paired_verdict(arms[CLIP_ONLY_LABEL], arms["non-private"])
                    ours += (f". σ=0 − non-private {_fmt_paired(s0)}: the DP schedule (clipping, Poisson "
                             f"sampling, its own rounds and steps) without noise, not the cost of the noise")
                cfgs = self.cfgs("ffa_table", self.ffa_runs(task, DP_LEVELS, [method]), match)
                out.append(self.row("c", papers.FFA, claim, ours, verdict, cfgs, "ffa_table"))
        return out

    def d(self):
        out = []
        tasks = self.ffa_tasks()
        for level in ("non-private",) + EPSILONS:
            claim = f"the FFA − FedAvg gap is largest on MNLI: {level}"
            gaps = {}
            for task in tasks:
                f, g = (_arm(self.ffa, task=task, method=m, privacy=level) for m in ("ffa_lora", "fedavg_lora"))
                common = sorted(set(f) & set(g))
                if common:
                    gaps[task] = ([f[s] - g[s] for s in common], _dead(task, f, g))
            shown = "; ".join(f"{t} {self._gap_text(d)}" + (" (both at chance)" if dead else "")
                              for t, (d, dead) in sorted(gaps.items()))
            if MOST_SKEWED_TASK not in gaps or len(gaps) < 2:
                need_mnli = MOST_SKEWED_TASK not in gaps
                match = (lambda s, lev=level, mn=need_mnli: s["family"] == "ffa_table" and lev in s["levels"]
                         and s["method"] in ("ffa_lora", "fedavg_lora")
                         and (s["task"] == MOST_SKEWED_TASK) == mn)
                text, cfg = self.not_run("ffa_table", match, "MNLI" if need_mnli else "a task beside MNLI")
                ours = (f"{shown}. " if shown else "") + text
                out.append(self.row("d", papers.FFA, claim, ours, "not run", [cfg], "ffa_table"))
                continue
            ours = "FFA − FedAvg, paired within each task, compared across tasks unpaired: " + shown
            mnli, dead = gaps[MOST_SKEWED_TASK]
            others = {t: d for t, (d, dd) in gaps.items() if t != MOST_SKEWED_TASK and not dd}
            cfgs = self.cfgs("ffa_table", [n for t in gaps for n in self.ffa_runs(t, [level])],
                             lambda s, lev=level: s["family"] == "ffa_table" and s["task"] in gaps
                             and lev in s["levels"])
            if dead:
                verdict = "inconclusive (MNLI: both at chance)"
            elif not others:
                verdict = "inconclusive (every other task: both at chance)"
            else:
                verdict = _largest(mnli, others)
            out.append(self.row("d", papers.FFA, claim, ours, verdict, cfgs, "ffa_table"))
        return out

    @staticmethod
    def _gap_text(d):
        m, h = sum(d) / len(d), _half(_sd(d), len(d))
        ci = "no interval" if math.isnan(h) else f"[{100 * (m - h):+.1f}, {100 * (m + h):+.1f}]"
        return f"{100 * m:+.1f} {ci} ({len(d)} seeds)"

    def e(self):
        out, claim = [], "FFA-LoRA uploads exactly half of FedAvg-LoRA's adapter bytes"
        df = self.ffa if self.ffa is not None and "cum_up_MB" in self.ffa else None
        done = set()
        if df is not None:
            df = df.copy()
            df["bytes"] = [int(round(x * MB)) for x in df["cum_up_MB"]]
            runs = df["run"] if "run" in df else ["*"] * len(df)
            df["schedule"] = ["-".join("*" if p == m else p for p in str(r).split("-"))
                              for r, m in zip(runs, df["method"])]
            keys = [k for k in ("seed", "variant", "privacy") if k in df]
            order = {lev: i for i, lev in enumerate(DP_LEVELS)}
            groups = sorted(df.groupby(["task", "schedule"], sort=True), key=lambda kv: (
                kv[0][0], min((order.get(p, len(order)) for p in kv[1].get("privacy", [])), default=0)))
            for (task, _), g in groups:
                ffa, fedavg, head = (g[g.method == m] for m in ("ffa_lora", "fedavg_lora", "head_only"))
                if ffa.empty or fedavg.empty:
                    continue
                done.add(task)
                out.append(self._exact_half(task, ffa, fedavg, head, keys, claim))
        for task in self.ffa_tasks():
            if task not in done:
                out.append(self.missing("e", papers.FFA, f"{claim}: {task}", "ffa_table",
                                        self.ffa_match(task, ["ffa_lora", "fedavg_lora"], DP_LEVELS),
                                        "FFA-LoRA and FedAvg-LoRA at one schedule"))
        return out

    def _exact_half(self, task, ffa, fedavg, head, keys, claim):
        levels = [lev for lev in DP_LEVELS if lev in set(ffa.get("privacy", []))]
        claim = f"{claim}: {task}, " + ", ".join(levels or ["one schedule"])
        names = sorted(set(ffa.get("run", [])) | set(fedavg.get("run", [])))
        cfgs = self.cfgs("ffa_table", names, self.ffa_match(task, ["ffa_lora", "fedavg_lora"], levels))
        run_cfgs = self.cfgs("ffa_table", names)          # the runs' own config.yaml: their schedule, not a spec
        ref_cfg = run_cfgs[0] if run_cfgs else None
        g_by = {tuple(r[k] for k in keys): r["bytes"] for _, r in fedavg.iterrows()}
        h_by = {tuple(r[k] for k in keys): r["bytes"] for _, r in head.iterrows()}
        head_run = sorted(set(head.get("run", []))) if len(head) else []
        head_src, per_fed_head = None, None
        if head_run and ref_cfg is not None:            # the head_only run must share the schedule
            hc = self.cfgs("ffa_table", head_run)
            same = hc and all(hc[0].get(k) == ref_cfg.get(k) for k in ("rounds", "num_clients", "client_fraction"))
            if not same:
                head_run = []
        if head_run:
            head_src = f"the head's upload from run `{head_run[0]}` (its upload is the head alone)"
        elif ref_cfg is not None:
            shape = _head_shape_bytes(ref_cfg, task)
            if shape is not None:
                per_fed_head, (per, count, hidden) = shape[0], shape[1:]
                labels = num_labels(task)
                head_src = (f"the head from its shape, stated as such: ({labels} × {hidden} + {labels}) float32 = "
                            f"{per:,} bytes per client-round × {count} client-rounds")
        pairs = []
        for _, r in ffa.iterrows():
            k = tuple(r[c] for c in keys)
            if k not in g_by:
                continue
            h = h_by.get(k, next(iter(h_by.values()), None)) if head_run else per_fed_head
            if h is None:
                continue
            pairs.append((r["bytes"], g_by[k], h))
        if head_src is None or not pairs:
            why = "no head_only run of this schedule and no run config to size the head" if head_src is None \
                else "no federation of FFA-LoRA with a FedAvg-LoRA twin"
            return self.row("e", papers.FFA, claim, "adapter bytes unknown", f"inconclusive ({why})", cfgs,
                            "ffa_table")
        ratios = [Fraction(f - h, g - h) if g > h else None for f, g, h in pairs]
        f, g, h = pairs[0]
        same_all = len(set(pairs)) == 1
        ours = (f"adapter bytes per federation: FFA {f - h:,} vs FedAvg {g - h:,} (uploads {f:,} and {g:,} from "
                f"the ledger, summary.json cum_up_bytes, minus {h:,}: {head_src})"
                + ("" if same_all else f"; first of {len(pairs)} federations, which differ"))
        if any(x is None for x in ratios):
            return self.row("e", papers.FFA, claim, ours, "inconclusive (FedAvg-LoRA's upload is not above the "
                            "head's)", cfgs, "ffa_table")
        distinct = sorted(set(ratios))
        exact = distinct == [Fraction(1, 2)]
        ours += "; ratio " + ("0.5 exactly" if exact else ", ".join(
            f"{float(x):.10g} ({x.numerator:,}/{x.denominator:,})" for x in distinct)) + \
            f" over {len(pairs)} federation{'s' if len(pairs) != 1 else ''}"
        return self.row("e", papers.FFA, claim, ours, "reproduced" if exact else "refuted", cfgs, "ffa_table")

    def f(self):
        out = []
        al = self.r.get("alpha")
        ranges = al.ranges if al is not None and al.ranges is not None and len(al.ranges) else None
        data = {(t, p) for t, p in zip(ranges["task"], ranges["privacy"])} if ranges is not None else set()
        mine = {(s["task"], lev) for s in self.specs("alpha", self.profile) for lev in s["levels"]} or \
            {(s["task"], lev) for p in self.profiles_of("alpha") for s in self.specs("alpha", p)
             for lev in s["levels"]}
        claim = "FFA-LoRA insensitive to LoRA α where FedAvg-LoRA is not (learning rate fixed across α)"
        for task, lev in sorted(data | mine) or [(ANY, ANY)]:
            c = f"{claim}: {task}, {lev}"
            g = ranges[(ranges.task == task) & (ranges.privacy == lev)] if ranges is not None else pd.DataFrame()
            fr, vr = (g[g.method == m] if len(g) else g for m in ("ffa_lora", "fedavg_lora"))
            match = (lambda s, t=task, lv=lev: s["family"] == "alpha" and _is(t, s["task"])
                     and (lv == ANY or lv in s["levels"]))
            if fr.empty or vr.empty:
                out.append(self.missing("f", papers.FFA, c, "alpha", match, f"both methods over α at {lev}"))
                continue
            ours, verdict = _range_rule(fr.iloc[0], vr.iloc[0])
            names = [s["name"] for s in self.specs("alpha", self.profile) if match(s)]
            out.append(self.row("f", papers.FFA, c, ours, verdict, self.cfgs("alpha", names, match), "alpha"))
        out += self.f_tuned()
        return out

    def f_tuned(self):
        claim = "FFA-LoRA insensitive to LoRA α, learning rate tuned per α"
        tuned = [r for r in self.runs("alpha") if tuned_per_alpha(r)]
        al = self.r.get("alpha")
        ranges = al.tuned if al is not None and al.tuned is not None and len(al.tuned) else None
        if ranges is None:
            def match(s):
                return s["family"] == "alpha" and s["tune"] is not None and \
                    "lora.alpha" not in (s["cfg"].get("sweep") or {})
            return [self.missing("f", papers.FFA, claim, "alpha", match, "an α grid with the learning rate tuned "
                                 "per α", self.cfgs("alpha", [], lambda s: s["family"] == "alpha"))]
        out = []
        for (task, lev), g in ranges.groupby(["task", "privacy"], sort=True):
            fr, vr = g[g.method == "ffa_lora"], g[g.method == "fedavg_lora"]
            if fr.empty or vr.empty:
                continue
            ours, verdict = _range_rule(fr.iloc[0], vr.iloc[0])
            out.append(self.row("f", papers.FFA, f"{claim}: {task}, {lev}", ours, verdict,
                                [r["cfg"] for r in tuned], "alpha"))
        return out or [self.row("f", papers.FFA, claim, "tuned runs hold only one method",
                                "inconclusive (no tuned α grid of both methods)", [r["cfg"] for r in tuned],
                                "alpha")]

    # --- SLoRA: the heterogeneity and slora families

    def het_tasks(self):
        data = set(self.het["task"]) if self.het is not None else set()
        return sorted(self.universe("heterogeneity", "task", data, everywhere=True)) or [ANY]

    def het_arm(self, task, method, part):
        return _arm(self.het, task=task, method=method, partition=part) if self.het is not None and \
            "partition" in self.het else {}

    def het_parts(self, task, methods=None):
        """Partitions of task, least skewed first: in the runs (where all of `methods` ran), else in the specs."""
        data = set()
        if self.het is not None and "partition" in self.het:
            t = self.het[self.het.task == task]
            data = {p for p in set(t["partition"])
                    if methods is None or all(self.het_arm(task, m, p) for m in methods)}
        if data:
            return sorted(data, key=partition_key)
        return sorted(self.universe("heterogeneity", "partition", (), lambda s: _is(task, s["task"])),
                      key=partition_key)

    def het_match(self, task, methods, part=None):
        return lambda s: (s["family"] == "heterogeneity" and _is(task, s["task"]) and s["method"] in methods
                          and (part is None or _is(part, s["partition"])))

    def het_cfgs(self, task, methods, parts):
        names = [] if self.het is None or "run" not in self.het else sorted(set(self.het[
            (self.het.task == task) & self.het.method.isin(methods) & self.het.partition.isin(parts)]["run"]))
        return self.cfgs("heterogeneity", names, self.het_match(task, methods))

    def het_lacking(self, cid, paper, claim, task, part, arms):
        """The "not run" row of a heterogeneity claim whose arms ({method: per-seed values}) lack a method at
        `part`, or None when every arm is there."""
        lacking = [m for m, a in arms.items() if not a]
        if not lacking:
            return None
        return self.missing(cid, paper, claim, "heterogeneity", self.het_match(task, lacking, part),
                            f"{' and '.join(lacking)} at {_pname(part)}",
                            self.het_cfgs(task, [m for m in arms if arms[m]], [part]))

    def g(self):
        """Today's rule: the FFT − LoRA gap at the most skewed partition minus the gap at the least skewed,
        paired by seed; inconclusive unless FedAvg-FFT is above chance at both ends (a gap to a chance-level FFT
        is no gap). The gaps are the heterogeneity family's peft_gap, computed from the same per-seed rows."""
        out = []
        claim = "LoRA's gap to full fine-tuning (FedAvg-FFT − FedAvg-LoRA) widens as Dirichlet α shrinks"
        for task in self.het_tasks():
            parts = [p for p in self.het_parts(task, ["fedavg_fft", PEFT_METHOD])
                     if self.het_arm(task, "fedavg_fft", p)]
            if len(parts) < 2:
                out.append(self.missing("g", papers.SLORA, f"{claim}: {task}", "heterogeneity",
                                        self.het_match(task, ["fedavg_fft", PEFT_METHOD]),
                                        "FedAvg-FFT and FedAvg-LoRA at two partitions or more"))
                continue
            gap, means = {}, []
            for k in parts:
                fft, lora = self.het_arm(task, "fedavg_fft", k), self.het_arm(task, PEFT_METHOD, k)
                gap[k] = {s: fft[s] - lora[s] for s in set(fft) & set(lora)}
                means.append(f"{_pname(k)} {100 * (_mean(fft) - _mean(lora)):+.1f}")
            first, last = parts[0], parts[-1]
            ours = "FFT − LoRA " + ", ".join(means)
            cfgs = self.het_cfgs(task, ["fedavg_fft", PEFT_METHOD], parts)
            if not set(gap[first]) & set(gap[last]):
                out.append(self.row("g", papers.SLORA, f"{claim}: {task}", ours, "inconclusive (no paired seeds)",
                                    cfgs, "heterogeneity"))
                continue
            v = paired_verdict(gap[last], gap[first])
            ours += f"; growth {_pname(first)} → {_pname(last)} {_fmt_paired(v)}"
            ch = _chance(task)
            dead = ch is not None and not all(learned(_mean(self.het_arm(task, "fedavg_fft", k)), ch)
                                              for k in (first, last))
            verdict = "inconclusive (FedAvg-FFT at chance)" if dead else _word(v)
            out.append(self.row("g", papers.SLORA, f"{claim}: {task}", ours, verdict, cfgs, "heterogeneity"))
        return out

    def h(self):
        out = []
        claim = "SLoRA closes most of LoRA's gap to FFT at the most skewed partition"
        for task in self.het_tasks():
            parts = self.het_parts(task, ["fedavg_fft", PEFT_METHOD]) or self.het_parts(task)
            if not parts:
                out.append(self.missing("h", papers.SLORA, f"{claim}: {task}", "heterogeneity",
                                        self.het_match(task, ["slora"]),
                                        "SLoRA beside FedAvg-FFT and FedAvg-LoRA"))
                continue
            part = parts[-1]
            c = f"{claim} ({_pname(part)}): {task}"
            arms = {m: self.het_arm(task, m, part) for m in ("fedavg_fft", PEFT_METHOD, "slora")}
            lacking = self.het_lacking("h", papers.SLORA, c, task, part, arms)
            if lacking:
                out.append(lacking)
                continue
            out.append(self._closes(c, task, part, arms))
        return out

    def _closes(self, claim, task, part, arms):
        fft, lora, sl = arms["fedavg_fft"], arms[PEFT_METHOD], arms["slora"]
        cfgs = self.het_cfgs(task, list(arms), [part])
        mf, ml, ms = _mean(fft), _mean(lora), _mean(sl)
        gap = paired_verdict(fft, lora)
        frac = (ms - ml) / (mf - ml) if mf != ml else math.nan
        seeds = sorted(set(fft) & set(lora) & set(sl))
        mid = {s: (fft[s] + lora[s]) / 2 for s in seeds}
        v = paired_verdict({s: sl[s] for s in seeds}, mid, margin=0.0) if seeds else None
        ours = (f"FFT {_fmt_mean(fft)}, LoRA {_fmt_mean(lora)}, SLoRA {_fmt_mean(sl)}; gap closed (SLoRA − LoRA)/"
                f"(FFT − LoRA) = ({100 * (ms - ml):+.1f})/({100 * (mf - ml):+.1f}) = "
                + ("undefined" if math.isnan(frac) else f"{frac:.2f}")
                + f" (≥ 0.5 claimed); FFT − LoRA {_fmt_paired(gap)}")
        if v is not None:
            ours += f"; SLoRA − (FFT + LoRA)/2 {_fmt_paired(v)}"
        ours += self._bytes_vs_fft(task, part, "slora") + self._rounds_to_lora(task, part)
        ch = _chance(task)
        if ch is not None and not learned(mf, ch):
            verdict = "inconclusive (FedAvg-FFT at chance)"
        elif gap.verdict != "reproduced":
            verdict = "inconclusive (no gap to close: the FFT − LoRA interval is not above 0)"
        elif v is None:
            verdict = "inconclusive (no seed in all three arms)"
        else:
            verdict = _word(v)
        return self.row("h", papers.SLORA, claim, ours, verdict, cfgs, "heterogeneity")

    def _bytes_vs_fft(self, task, part, method):
        t = self.het[(self.het.task == task) & (self.het.partition == part)]
        if "cum_up_MB" not in t:
            return ""
        a, f = t[t.method == method]["cum_up_MB"], t[t.method == "fedavg_fft"]["cum_up_MB"]
        if a.empty or f.empty:
            return ""
        return (f"; cumulative upload {_mb(a.mean() * MB)} = {100 * a.mean() / f.mean():.2f}% of FFT's "
                f"{_mb(f.mean() * MB)}")

    def _rounds_to_lora(self, task, part):
        """Per seed: the first evaluated round at which SLoRA reaches FedAvg-LoRA's final accuracy, beside the
        round at which FedAvg-LoRA itself first does (per-round curves, load.curve_frame)."""
        runs = [r for r in self.runs("heterogeneity") if r["cfg"] and r["cfg"].get("task") == task
                and r["meta"].get("labels", {}).get("partition") == part]
        if not runs:
            return "; rounds to FedAvg-LoRA's final accuracy: no run files read"
        label = {r["name"]: r["meta"].get("labels", {}).get("method") for r in runs}
        cv = curve_frame(runs)
        if cv.empty:
            return "; rounds to FedAvg-LoRA's final accuracy: no per-round accuracy in metrics.jsonl"
        cv["label"] = [label.get(r) or m for r, m in zip(cv["run"], cv["method"])]
        # FedAvg-LoRA's final accuracy on the rows its curve scores (a fixed subset under curve_eval_subsample)
        last = last_point(cv[cv.label == PEFT_METHOD])
        finals = dict(zip(last["seed"].astype(int), last["acc"])) or self.het_arm(task, PEFT_METHOD, part)
        parts = []
        for seed in sorted(finals):
            target = finals[seed]

            def first(method):
                c = cv[(cv.label == method) & (cv.seed == seed)].sort_values("round")
                hit = c[c["acc"] >= target]
                return str(int(hit["round"].iloc[0])) if len(hit) else "not reached" if len(c) else "no curve"
            parts.append(f"seed {seed}: SLoRA {first('slora')} vs FedAvg-LoRA {first(PEFT_METHOD)}")
        every = "/".join(str(e) for e in sorted({int(r["cfg"].get("eval_every", 1)) for r in runs}))
        every = "every round" if every == "1" else f"every {every} rounds"
        return f"; first round reaching FedAvg-LoRA's final accuracy (evaluated {every}): " + "; ".join(parts)

    def i(self):
        """Accuracy per stage-1 density beside FedAvg-FFT at the same setting, today's "comparable" rule: from the
        slora family's typed result, completed by the runs (the quick profile's 1% run is the heterogeneity
        family's)."""
        out = []
        sl = self.r.get("slora")
        dens = sl.density if sl is not None and sl.density is not None and len(sl.density) else None
        cells, ref_fft, task = self._slora_from_runs()
        fft = sl.fft if sl is not None and sl.fft is not None else ref_fft
        chance = sl.chance if sl is not None and sl.chance is not None else _chance(task) if task else None
        for d in DENSITIES:
            claim = f"SLoRA at stage-1 density {100 * d:g}% beside FedAvg-FFT"
            cell = dens[(dens["density"] - d).abs() < 1e-12] if dens is not None else pd.DataFrame()
            cell = cell.iloc[0] if len(cell) else cells.get(d)
            match = (lambda s, dd=d: s["method"] == "slora"
                     and abs(float(s["params"].get("density", -1)) - dd) < 1e-12)
            if cell is None:
                out.append(self.missing("i", papers.SLORA, claim, "slora", match, f"density {d:g}"))
                continue
            names = [s["name"] for s in self.specs("slora", self.profile) if s["family"] == "slora" and match(s)]
            cfgs = self.cfgs("slora", names, match)
            ours = f"SLoRA {_fmt_cell(cell['mean'], cell['std'], cell['n'])}"
            if fft is None:
                out.append(self.row("i", papers.SLORA, claim, ours, "inconclusive (no FedAvg-FFT reference at the "
                                    "same setting)", cfgs, "slora"))
                continue
            delta, t = cell["mean"] - fft["mean"], tol(cell["std"], fft["std"])
            ours += (f" vs FedAvg-FFT {_fmt_cell(fft['mean'], fft['std'], fft['n'])}; Δ {100 * delta:+.1f} points "
                     f"(comparable = Δ ≥ −{100 * t:.1f}, the larger of {100 * COMPARABLE_TOL:.0f} points and the "
                     f"larger seed std)")
            dead = chance is not None and not learned(fft["mean"], chance)
            verdict = ("inconclusive (FedAvg-FFT at chance)" if dead else ONE_SEED if min(cell["n"], fft["n"]) < 2
                       else "reproduced" if delta >= -t else "refuted")
            out.append(self.row("i", papers.SLORA, claim, ours, verdict, cfgs, "slora"))
        return out

    def _slora_from_runs(self):
        """({density: cell}, FedAvg-FFT cell or None, task) from the slora family's runs (at their most common
        stage-1 length) and the heterogeneity family's runs at the same setting (scripts/figures/families/
        slora.py's reference rule)."""
        runs = self.runs("slora")
        if not runs:
            return {}, None, None
        from scripts.figures.families.slora import _reference

        def cells(df):
            return {float(d): pd.Series(dict(mean=g["acc"].mean(), std=_sd(g["acc"]), n=len(g)))
                    for d, g in df.groupby("method.density")} if len(df) and "method.density" in df else {}
        own = federation_frame(runs)
        if len(own) and "method.stage1_rounds" in own:
            own = own[own["method.stage1_rounds"] == own["method.stage1_rounds"].mode().iloc[0]]
        ref = _reference(self.root, self.profile, runs)
        fft = ref[ref.method == "fedavg_fft"] if len(ref) else ref
        fft = pd.Series(dict(mean=fft["acc"].mean(), std=_sd(fft["acc"]), n=len(fft))) if len(fft) else None
        task = next((r["cfg"]["task"] for r in runs if r["cfg"]), None)
        return {**cells(ref[ref.method == "slora"] if len(ref) else ref), **cells(own)}, fft, task

    # --- SA-FedLoRA: the heterogeneity family (communication is a view over its runs)

    def sa_cells(self):
        """[(task, partition, reading)]: every task (of any profile), at each partition where an SA-FedLoRA
        reading ran or this profile's section holds one (else at its most skewed partition), both readings."""
        where = set()
        if self.het is not None and "partition" in self.het:
            sel = self.het[self.het.method.isin(SA_READINGS)]
            where = set(zip(sel["task"], sel["partition"]))
        where |= {(s["task"], s["partition"]) for s in self.specs("heterogeneity", self.profile)
                  if s["family"] == "heterogeneity" and s["method"] in SA_READINGS}
        out = set()
        for task in self.het_tasks():
            parts = {p for t, p in where if t == task} or set(self.het_parts(task)[-1:]) or {ANY}
            out |= {(task, p, rd) for p in parts for rd in SA_READINGS}
        return sorted(out, key=lambda c: (c[0], partition_key(c[1] or ""), c[2]))

    def sa_run(self, task, part, reading):
        for r in self.runs("heterogeneity"):
            lab = r["meta"].get("labels", {})
            if r["cfg"] and r["cfg"].get("task") == task and lab.get("partition") == part and (
                    lab.get("method") == reading or _reading(r["cfg"]["method"]["name"],
                                                             r["cfg"]["method"].get("init_stage")) == reading):
                return r
        return None

    def j(self):
        out = []
        for task, part, reading in self.sa_cells():
            claim = f"fewer communicated parameters than FedAvg-FFT: {task}, {_pname(part)}, {reading}"
            arms = {m: self.het_arm(task, m, part) for m in (reading, "fedavg_fft")}
            lacking = self.het_lacking("j", papers.SA_FEDLORA, claim, task, part, arms)
            if lacking:
                out.append(lacking)
                continue
            t = self.het[(self.het.task == task) & (self.het.partition == part)]
            sa_b, fft_b = (t[t.method == m]["cum_up_MB"].mean() * MB for m in (reading, "fedavg_fft"))
            red = 1 - sa_b / fft_b
            sa, fft = arms[reading], arms["fedavg_fft"]
            delta, tl = _mean(sa) - _mean(fft), tol(_sd(sa.values()), _sd(fft.values()))
            ours = (f"reduction {100 * red:.2f}% = " + self._formula(task, part, reading, sa_b, fft_b)
                    + f"; accuracy {_fmt_mean(sa)} vs FedAvg-FFT {_fmt_mean(fft)} (Δ {100 * delta:+.1f} points, "
                    f"tolerance {100 * tl:.1f})")
            ch = _chance(task)
            if ch is not None and not learned(_mean(fft), ch):
                verdict = "inconclusive (FedAvg-FFT at chance)"
            elif red < 0:
                verdict = "refuted (uploads more than FedAvg-FFT)"
            elif min(len(sa), len(fft)) < 2:
                verdict = ("underpowered (fewer bytes, exactly; the accuracy condition has one seed per arm: no "
                           "spread to judge its Δ by)")
            elif delta < -tl:
                verdict = "refuted (accuracy below FedAvg-FFT by more than the tolerance)"
            else:
                verdict = "reproduced"
            out.append(self.row("j", papers.SA_FEDLORA, claim, ours, verdict,
                                self.het_cfgs(task, [reading, "fedavg_fft"], [part]), "heterogeneity"))
        return out

    def _formula(self, task, part, reading, sa_b, fft_b):
        """1 − [T_init |θ_init| + Σ_t |LoRA(r_t)|] / (T |θ|) with our ledger's bytes and the run's schedule."""
        run = self.sa_run(task, part, reading)
        fft_run = next((r for r in self.runs("heterogeneity") if r["cfg"] and r["cfg"].get("task") == task
                        and r["meta"].get("labels", {}).get("partition") == part
                        and r["cfg"]["method"]["name"] == "fedavg_fft"), None)
        if run is None:
            return (f"1 − {_mb(sa_b)} / {_mb(fft_b)} (FedAvg-FFT) from summary.json; schedule not read "
                    f"(no run files)")
        s = _sa_schedule(run["cfg"])
        healthy = {f["federation"] for f in run["summary"].get("federations", []) if f.get("status") == "finished"}
        per_fed = {}
        for m in run["metrics"]:
            if "up_bytes" in m and m["federation"] in healthy:
                stage = "init" if m["round"] <= s["init_rounds"] else "lora"
                per_fed.setdefault(m["federation"], {"init": 0, "lora": 0})[stage] += m["up_bytes"]
        sched = (f"schedule init_rounds {s['init_rounds']} ({s['init_stage']}), heating_rounds "
                 f"{s['heating_rounds']}, anneal_rounds {s['anneal_rounds']}, rank {s['heating_rank']} → "
                 f"cooling_rank {s['cooling_rank']}, rounds {s['rounds']}")
        fft_t = fft_run["cfg"]["rounds"] if fft_run else "?"
        if not per_fed:
            return f"1 − {_mb(sa_b)} / {_mb(fft_b)} (FedAvg-FFT, {fft_t} rounds); {sched}; no per-round ledger"
        init = sum(v["init"] for v in per_fed.values()) / len(per_fed)
        lora = sum(v["lora"] for v in per_fed.values()) / len(per_fed)
        return (f"1 − [T_init|θ_init| {_mb(init)} (rounds 1–{s['init_rounds']}) + Σ_t |LoRA(r_t)| {_mb(lora)} "
                f"(rounds {s['init_rounds'] + 1}–{s['rounds']})] / T|θ| {_mb(fft_b)} (FedAvg-FFT, {fft_t} rounds) "
                f"= {100 * (1 - (init + lora) / fft_b):.2f}%, per-round up_bytes of metrics.jsonl; {sched}")

    def k(self):
        out = []
        cells = self.sa_cells()
        for task, part, reading in cells:
            claim = (f"accuracy not below FedAvg-FFT and fixed-rank FedAvg-LoRA: {task}, {_pname(part)}, "
                     f"{reading}")
            arms = {m: self.het_arm(task, m, part) for m in (reading, "fedavg_fft", PEFT_METHOD)}
            lacking = self.het_lacking("k", papers.SA_FEDLORA, claim, task, part, arms)
            if lacking:
                out.append(lacking)
                continue
            sa, parts, words, seeds_needed = arms[reading], [], [], []
            for ref, name in (("fedavg_fft", "FedAvg-FFT"), (PEFT_METHOD, "FedAvg-LoRA")):
                if not set(sa) & set(arms[ref]):
                    parts.append(f"{name}: no paired seeds")
                    words.append("inconclusive")
                    continue
                v = _noninferior(sa, arms[ref])
                parts.append(f"{reading} − {name} {_fmt_paired(v)}")
                words.append("inconclusive" if _dead(task, sa, arms[ref]) else v.verdict)
                seeds_needed.append(v.seeds_needed or 0)
            ours = (f"{reading} {_fmt_mean(sa)}; " + "; ".join(parts) +
                    f" (not below = the paired interval lies above −{100 * COMPARABLE_TOL:.0f} points)")
            if "refuted" in words:
                verdict = "refuted"
            elif all(w == "reproduced" for w in words):
                verdict = "reproduced"
            elif "inconclusive" in words:
                verdict = "inconclusive (an arm at chance, or no paired seeds)"
            else:
                n = max(seeds_needed)
                verdict = f"underpowered (≈{n} seeds would decide)" if n else "underpowered"
            out.append(self.row("k", papers.SA_FEDLORA, claim, ours, verdict,
                                self.het_cfgs(task, list(arms), [part]), "heterogeneity"))
        for task, reading in sorted({(c[0], c[2]) for c in cells}):
            out.append(self._upload_monotone(task, reading, [c[1] for c in cells if c[:3:2] == (task, reading)]))
        return out

    def _upload_monotone(self, task, reading, parts):
        claim = f"per-round upload non-increasing while annealing: {task}, {reading}"
        runs = [r for r in (self.sa_run(task, p, reading) for p in parts) if r is not None]
        if not runs:
            match = self.het_match(task, [reading])
            if self.het is not None and len(self.het[(self.het.task == task) & (self.het.method == reading)]):
                return self.row("k", papers.SA_FEDLORA, claim, "no run files read (metrics.jsonl)",
                                "inconclusive (no per-round ledger)", self.het_cfgs(task, [reading], parts),
                                "heterogeneity")
            return self.missing("k", papers.SA_FEDLORA, claim, "heterogeneity", match, reading,
                                self.het_cfgs(task, ["fedavg_fft", PEFT_METHOD], parts))
        checked, bad, texts = 0, [], []
        for r in runs:
            s = _sa_schedule(r["cfg"])
            ok, seq, broken = upload_nonincreasing(r["metrics"], s["init_rounds"], s["rounds"],
                                                  _finished(r["summary"]))
            checked += len(seq)
            bad += [f"`{r['name']}` {b}" for b in broken]
            if seq:
                first = next(iter(seq.values()))
                texts.append(f"`{r['name']}` rounds {s['init_rounds'] + 1}–{s['rounds']} (after the initiating "
                             f"stage; rank {s['heating_rank']} → {s['cooling_rank']}): "
                             + ", ".join(_mb(x) for x in first) + (" (federation 0)" if len(seq) > 1 else ""))
        if not checked:
            return self.row("k", papers.SA_FEDLORA, claim, "no per-round up_bytes in metrics.jsonl",
                            "inconclusive (no per-round ledger)", [r["cfg"] for r in runs], "heterogeneity")
        ours = "per-round upload, metrics.jsonl up_bytes: " + "; ".join(texts) + \
            (f"; increases: {'; '.join(bad)}" if bad else f"; non-increasing in all {checked} federations")
        return self.row("k", papers.SA_FEDLORA, claim, ours, "refuted" if bad else "reproduced",
                        [r["cfg"] for r in runs], "heterogeneity")

    # --- the methods family's claims (unchanged)

    def methods(self):
        return [ClaimRow(label, paper, claim, papers.NOT_REPORTED, numbers, verdict,
                         "the paper's setting " + papers.NOT_REPORTED + "; ours: see the methods section",
                         "methods")
                for paper, claim, label, verdict, numbers in _method_claims(self.r.get("methods"))]


# ----------------------------------------------------------------------------- rules

def _largest(target, others):
    """(d): is target's mean gap above every other task's? Unpaired across tasks: reproduced if its 95% interval
    lies above each other's, refuted if some other's lies above it, underpowered otherwise (with the seeds per task
    that would separate the intervals at the observed means and spreads)."""
    def iv(d):
        m, h = sum(d) / len(d), _half(_sd(d), len(d))
        return m, (m - h, m + h) if not math.isnan(h) else (math.nan, math.nan)
    _, (lo, hi) = iv(target)
    needed = []
    for t, d in sorted(others.items()):
        _, (olo, ohi) = iv(d)
        known = not (math.isnan(lo) or math.isnan(olo))
        if known and olo > hi:
            return f"refuted ({t}'s gap lies above MNLI's)"
        if not (known and ohi < lo):                    # the intervals overlap (or one has none)
            needed.append(_seeds_to_separate(target, d))
    if not needed:
        return "reproduced"
    if any(n is None for n in needed):
        return "underpowered (equal means: no seed count up to 1000 would separate them)"
    return f"underpowered (≈{max(needed)} seeds per task would separate the intervals)"


def _seeds_to_separate(a, b):
    diff = abs(sum(a) / len(a) - sum(b) / len(b))
    sa, sb = _sd(a), _sd(b)
    if len(a) < 2 or len(b) < 2:
        return 3
    if diff == 0:
        return None
    return next((k for k in range(2, 1001) if _half(sa, k) + _half(sb, k) < diff), None)


def _range_rule(f, v):
    """(f): a method is insensitive to α when its accuracy range over α (max - min of the means) is within the
    tolerance t = max(2 points, the larger mean seed std). FFA insensitive and FedAvg not -> reproduced; FFA
    sensitive -> refuted (whatever FedAvg does: the claim is about FFA); both insensitive -> inconclusive (this α
    grid does not separate them). Before that: fewer than 2 seeds in a cell -> underpowered (no spread to set t
    by); a method above chance at no more than half of the α values -> inconclusive (a small range from not
    learning says nothing)."""
    s = max(f["mean_std"], v["mean_std"])
    t = max(COMPARABLE_TOL, s)
    ours = (f"accuracy range over α FFA {100 * f['range']:.1f} vs FedAvg {100 * v['range']:.1f} points (insensitive "
            f"= range ≤ {100 * t:.1f}, the larger of {100 * COMPARABLE_TOL:.0f} points and the mean seed std); above "
            f"chance at {f['learned_cells']}/{f['cells']} (FFA) and {v['learned_cells']}/{v['cells']} (FedAvg) α "
            f"values")
    if min(f.get("min_seeds", 2), v.get("min_seeds", 2)) < 2:
        return ours, ONE_SEED
    if min(f["learned_cells"], v["learned_cells"]) * 2 <= f["cells"]:
        return ours, "inconclusive (a method above chance at no more than half of the α values)"
    if f["range"] > t:
        return ours, "refuted (FFA-LoRA's accuracy moves with α)"
    if v["range"] > t:
        return ours, "reproduced"
    return ours, "inconclusive (neither method moves with α over this grid)"


def _finished(summary):
    return {f["federation"] for f in summary.get("federations", []) if f.get("status", "finished") == "finished"}


def upload_nonincreasing(metrics, init_rounds, rounds, federations=None):
    """(ok, {federation: [up_bytes of rounds init_rounds+1 .. rounds]}, [what broke]) from metrics.jsonl rows:
    after SA-FedLoRA's initiating stage (heating, annealing, cooling) no round may upload more than the one
    before it."""
    seq = {}
    for m in sorted(metrics, key=lambda m: (m.get("federation", 0), m["round"])):
        fed = m.get("federation", 0)
        if "up_bytes" not in m or m["round"] <= init_rounds or m["round"] > rounds or (
                federations is not None and fed not in federations):
            continue
        seq.setdefault(fed, []).append((m["round"], m["up_bytes"]))
    broken = []
    for fed, s in seq.items():
        for (r0, b0), (r1, b1) in zip(s, s[1:]):
            if b1 > b0:
                broken.append(f"federation {fed} round {r0} → {r1}: {b0:,} → {b1:,} bytes")
    return not broken, {f: [b for _, b in s] for f, s in seq.items()}, broken


def _sa_schedule(cfg):
    from methods.sa_fedlora import SAParams
    p = SAParams()
    known = {f.name for f in fields(SAParams)}
    vals = {f.name: getattr(p, f.name) for f in fields(SAParams)}
    vals.update({k: v for k, v in (cfg.get("method") or {}).items() if k in known})
    rank = int((cfg.get("lora") or {}).get("rank", 8))
    return dict(init_rounds=int(vals["init_rounds"]), heating_rounds=int(vals["heating_rounds"]),
                anneal_rounds=int(vals["anneal_rounds"]), cooling_rank=int(vals["cooling_rank"]),
                heating_rank=int(vals["heating_rank"] or rank), init_stage=vals["init_stage"],
                rounds=int(cfg.get("rounds", 0)))


def _head_shape_bytes(cfg, task):
    """(head bytes per federation, per client-round, client-rounds, hidden) from the head's shape, num_labels x
    hidden + num_labels float32, over rounds x clients per round; None if the model's hidden size is unknown."""
    from fedsim.sampling import clients_per_round
    hidden = _hidden_size(cfg.get("model"))
    if hidden is None:
        return None
    labels = num_labels(task)
    per = (labels * hidden + labels) * 4
    count = int(cfg["rounds"]) * clients_per_round(int(cfg["num_clients"]), float(cfg.get("client_fraction", 1.0)))
    return per * count, per, count, hidden


def _hidden_size(model):
    try:
        from fedsim.models import resolve_model
        src, local = resolve_model(model)
        return int(json.loads((Path(src) / "config.json").read_text())["hidden_size"]) if local else None
    except Exception:
        return None


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
    """[(paper, claim, method label, verdict, numbers)] of the methods family."""
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
                         + (" [no verdict, both at chance]" if dead else f" [{v.text()}]")
                         + (_personal_baselines(seeds[seeds.task == task], means[0])
                            if column == "acc_personal" else ""))
            verdicts.append("inconclusive (both at chance)" if dead else v.verdict)
        if parts:
            metric = "personalized accuracy" if column == "acc_personal" else "accuracy"
            out.append((paper, claim, label, _combine(verdicts), "; ".join(parts) + f" ({metric}, paired by "
                        f"seed: reproduced if the 95% interval of the difference lies above 0)."))
    return out


def _personal_baselines(seeds, mean):
    """The personalized baselines beside a personalized mean: local-only training (the local_lora run) and the
    local majority label (every run's summary), and whether the mean is above both; '' without either."""
    local = seeds[seeds.label == "local_lora"]["acc_personal"].dropna() if "acc_personal" in seeds else []
    major = seeds["personal_majority"].dropna() if "personal_majority" in seeds else []
    have = {name: float(x.mean()) for name, x in (("local-only", local), ("local majority label", major))
            if len(x)}
    if not have:
        return ""
    text = ", ".join(f"{name} {100 * m:.1f}" for name, m in have.items())
    above = all(mean > m for m in have.values())
    return f"; baselines: {text} ({'above' if above else 'NOT above'} {'both' if len(have) == 2 else 'it'}: " + (
        "the personalization beats what each client reaches alone)" if above else
        "each client alone does as well, so the win over FedAvg-LoRA is the skew, not the method)")


def _combine(verdicts):
    from scripts.verdicts import combine
    return combine(verdicts) if verdicts else "inconclusive"
