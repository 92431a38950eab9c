"""Experiment families and profiles: which runs exist (the one place that knows).

A family is one YAML file in configs/ (every file with a `family:` key) holding one section per profile:
`paper` (the papers' scale, for a GPU), `quick` (a CPU, smaller model and data, labeled as such in every
output; it touches every seed claim), `standard` (a CPU, enough seeds to decide the claims) and `smoke`
(seconds per family, for the tests); a family without a section for the chosen profile is
skipped, and said so (naming it in scripts.reproduce --only is an error). A profile section expands into
runs: `base` (fedsim config keys, as in fedsim/config.py DEFAULTS) x the cartesian product of `axes`
(each value sets config keys and gives the run a label), then `task_overrides` for the run's task, then
every `when` rule whose `match` ({axis: label or [labels]}) fits the run; `exclude` rules (the same form)
drop combinations. Seeds and sweeps (optimizer.lr, lora.alpha, dp.epsilon, dp.max_grad_norm) are
federations inside one run, not separate runs.

Used by scripts.reproduce (to run them) and scripts.figures (to render them).
Profile: --profile, else $PROFILE, else `paper` when CUDA is available and `quick` otherwise.
Results root: --results, else $FEDSIM_RESULTS, else results/.
"""
import copy
import itertools
import os
from pathlib import Path

import yaml

from fedsim import config as C
from methods import method_for

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
PROFILES = ("smoke", "quick", "standard", "paper")
FAMILIES = ("ffa_table", "dp_recipe", "heterogeneity", "alpha", "rank", "slora", "communication", "methods")


# ----------------------------------------------------------------------------- profiles and paths

def detect_profile(explicit=None):
    """--profile, else $PROFILE, else paper with CUDA and quick without."""
    if explicit:
        return explicit
    env = os.environ.get("PROFILE", "").strip()
    if env:
        if env not in PROFILES:
            raise ValueError(f"PROFILE={env!r}: valid profiles are {list(PROFILES)}")
        return env
    try:
        import torch
        return "paper" if torch.cuda.is_available() else "quick"
    except ImportError:
        return "quick"


def results_root(explicit=None):
    return Path(explicit or os.environ.get("FEDSIM_RESULTS") or REPO / "results")


def load_families(config_dir=CONFIG_DIR):
    """{family name: parsed YAML} for every configs/*.yaml with a `family:` key, in FAMILIES order."""
    fams = {}
    for path in sorted(Path(config_dir).glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        if isinstance(doc, dict) and "family" in doc:
            doc["_path"] = str(path)
            fams[doc["family"]] = doc
    order = {f: i for i, f in enumerate(FAMILIES)}
    return dict(sorted(fams.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def with_profile(families, profile):
    """The names of the families that have a section for profile, in families' order."""
    return [f for f, doc in families.items() if profile in (doc.get("profiles") or {})]


# ----------------------------------------------------------------------------- expansion

def deep_update(dst, src):
    """dst updated by src, nested sections merged; a section that names another kind (a new method,
    partition or optimizer `name`) replaces the old one, whose parameters mean nothing to the new kind."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in ("sweep",) \
                and v.get("name", dst[k].get("name")) == dst[k].get("name"):
            deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _axis_values(axis):
    """[(label, overrides)] of one axis. A value is a scalar (sets `key`; `method` sets method.name) or
    {label: ..., set: {...}}."""
    out = []
    for v in axis["values"]:
        if isinstance(v, dict):
            out.append((str(v["label"]), v.get("set", {})))
        elif axis.get("key") == "method":
            out.append((str(v), {"method": {"name": v}}))
        else:
            out.append((str(v), {axis["key"]: v}))
    return out


def build_config(*layers):
    """DEFAULTS merged with override layers (nested dicts, dotted keys allowed), then validated."""
    cfg = copy.deepcopy(C.DEFAULTS)
    for layer in layers:
        C._merge(cfg, copy.deepcopy(layer))
    cfg = C.validate(cfg)
    method_for(cfg)                                                 # the method's own checks, as a run makes them
    return cfg


def _matches(labels, rule):
    """Whether a run's axis labels fit a `when` match or an `exclude` rule: {axis: label or [labels]}."""
    return all(labels.get(k) in [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in rule.items())


def expand(family_doc, profile):
    """The runs of one family and profile: [{name, labels, overrides, notes}] (configs not yet built)."""
    if profile not in family_doc.get("profiles", {}):
        raise ValueError(f"family {family_doc['family']} has no profile {profile!r} in {family_doc.get('_path')}")
    prof = family_doc["profiles"][profile]
    if "runs_from" in prof:          # a view over another family's runs (e.g. communication)
        return []
    axes = prof.get("axes", [])
    names = [a["name"] for a in axes]
    runs = []
    for combo in itertools.product(*[_axis_values(a) for a in axes]):
        labels = {n: lab for n, (lab, _) in zip(names, combo)}
        over = deep_update({}, prof.get("base", {}))
        for _, o in combo:
            over = deep_update(over, o)
        task = over.get("task", C.DEFAULTS["task"])
        over = deep_update(over, prof.get("task_overrides", {}).get(task, {}))
        for rule in prof.get("when", []):                # e.g. a method's own learning rate
            if _matches(labels, rule["match"]):
                over = deep_update(over, rule["set"])
        tune = over.pop("tune", None)                    # not a config key: the tuning protocol of this run
        for rule in prof.get("exclude", []):             # combinations that make no sense
            if _matches(labels, rule):
                break
        else:
            runs.append(dict(name="-".join(labels[n] for n in names), labels=labels, overrides=over,
                             notes=list(prof.get("notes", [])), tune=tune))
    return runs


def required(family_doc, profile, families):
    """Runs of other families this family's figures read ({family: [run names]})."""
    prof = family_doc["profiles"].get(profile, {})
    out = {}
    for req in ([prof["runs_from"]] if "runs_from" in prof else []) + prof.get("requires", []):
        fam = req["family"]
        where = req.get("where", {})
        runs = [r for r in expand(families[fam], profile)
                if all(r["labels"].get(k) in [str(x) for x in (v if isinstance(v, list) else [v])]
                       for k, v in where.items())]
        out.setdefault(fam, []).extend(r["name"] for r in runs)
    return out
