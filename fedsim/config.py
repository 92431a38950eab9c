"""Experiment configuration: visible defaults, YAML files, `--set a.b=value` overrides, checked up front.

A config is a plain nested dict. Every key must exist in DEFAULTS (a typo is an error listing the valid
keys), except inside `method` (method parameters, checked by the method) and `partition` (partition
parameters, checked by the partition function). `validate` rejects bad values before any compute.
"""
import copy
import itertools

import yaml

DEFAULTS = {
    "task": "sst2",
    "data_dir": None,            # else $FEDSIM_DATA, ../shared/data, the HF hub
    "max_length": 64,
    "padding": "longest",        # or max_length
    "train_subsample": None,     # rows of the train split (deterministic) for quick runs
    "eval_subsample": 1000,
    "strip_metadata": False,     # 20 Newsgroups: drop headers/footers/quotes like scikit-learn
    "model": "all-MiniLM-L6-v2",
    "num_hidden_layers": None,   # keep the first k pretrained layers
    "num_clients": 3,
    "client_fraction": 1.0,
    "partition": {"name": "dirichlet", "alpha": 0.5},
    "rounds": 10,
    "local_steps": 10,
    "batch_size": 16,            # expected batch under DP (Poisson sampling)
    "eval_every": 1,
    "eval_batch_size": 128,
    "method": {"name": "fedavg_lora"},
    "lora": {"rank": 8, "alpha": 16.0, "targets": ["query", "value"]},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0,
                  "betas": [0.9, 0.999], "eps": 1e-8},
    "dp": {"epsilon": None, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "rdp",
           "max_batch_factor": 5.0},
    "seeds": [0],                # each seed is a federation in the same pass
    "sweep": {},                 # shape-preserving variants run as more federations, e.g. {"optimizer.lr": [0.01, 0.1]}
    "replica_chunk": None,       # replicas per forward/backward; None = all (GPU) / measured (CPU)
    "device": "auto",
}

SWEEPABLE = ("optimizer.lr", "lora.alpha", "dp.epsilon")
OPEN_SECTIONS = ("method", "partition")


def set_path(cfg, dotted, value):
    keys = dotted.split(".")
    node, valid = cfg, DEFAULTS
    for i, k in enumerate(keys):
        open_section = i > 0 and keys[i - 1] in OPEN_SECTIONS and i == len(keys) - 1
        if not open_section and (not isinstance(valid, dict) or k not in valid):
            opts = sorted(valid) if isinstance(valid, dict) else []
            raise ValueError(f"unknown config key '{dotted}'; valid keys at that level: {opts}")
        if i == len(keys) - 1:
            node[k] = value
        else:
            node, valid = node.setdefault(k, {}), valid[k]


def _merge(cfg, overrides, prefix=""):
    for k, v in overrides.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and k not in OPEN_SECTIONS and k != "sweep":
            _merge(cfg, v, path + ".")
        elif isinstance(v, dict) and k in OPEN_SECTIONS:
            if "name" in v and v["name"] != cfg[k].get("name"):
                cfg[k] = {}                     # a new method/partition starts from its own defaults
            for kk, vv in v.items():
                set_path(cfg, f"{path}.{kk}", vv)
        else:
            set_path(cfg, path, v)


def parse_set(items):
    """['dp.epsilon=3', 'seeds=[0,1]'] -> {'dp.epsilon': 3, 'seeds': [0, 1]} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def load_config(path=None, overrides=None, base=None):
    cfg = copy.deepcopy(base or DEFAULTS)
    if path:
        with open(path) as f:
            _merge(cfg, yaml.safe_load(f) or {})
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and k in OPEN_SECTIONS:
            _merge(cfg, {k: v})
        else:
            set_path(cfg, k, v)
    validate(cfg)
    return cfg


def get_path(cfg, dotted):
    node = cfg
    for k in dotted.split("."):
        node = node[k]
    return node


def federations(cfg):
    """[(seed, {sweep key: value})] for every federation sharing the pass: seeds x sweep product."""
    keys = list(cfg["sweep"])
    combos = list(itertools.product(*[cfg["sweep"][k] for k in keys])) or [()]
    return [(s, dict(zip(keys, c))) for s in cfg["seeds"] for c in combos]


def validate(cfg):
    """Bad values -> one ValueError naming the fix, before any data or model is touched."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)
    need(cfg["num_clients"] >= 1, f"num_clients must be >= 1 (got {cfg['num_clients']})")
    need(0 < cfg["client_fraction"] <= 1, f"client_fraction must be in (0, 1] (got {cfg['client_fraction']})")
    need(cfg["local_steps"] >= 1, f"local_steps (K) must be >= 1 (got {cfg['local_steps']})")
    need(cfg["rounds"] >= 1, f"rounds must be >= 1 (got {cfg['rounds']})")
    need(cfg["batch_size"] >= 1, f"batch_size must be >= 1 (got {cfg['batch_size']})")
    need(cfg["eval_every"] >= 1, f"eval_every must be >= 1 (got {cfg['eval_every']})")
    need(int(cfg["lora"]["rank"]) >= 1, f"lora.rank must be >= 1 (got {cfg['lora']['rank']}); LoRA needs a positive rank")
    need(cfg["lora"]["alpha"] > 0, f"lora.alpha must be > 0 (got {cfg['lora']['alpha']})")
    need(cfg["optimizer"]["lr"] > 0, f"optimizer.lr must be > 0 (got {cfg['optimizer']['lr']})")
    need(cfg["padding"] in ("longest", "max_length"), f"padding must be 'longest' or 'max_length' (got {cfg['padding']})")
    need(isinstance(cfg["seeds"], list) and len(cfg["seeds"]) >= 1, "seeds must be a non-empty list, e.g. [0, 1, 2]")
    for k, vals in cfg["sweep"].items():
        need(k in SWEEPABLE, f"sweep key '{k}' does not keep tensor shapes; sweepable keys: {list(SWEEPABLE)}")
        need(isinstance(vals, list) and len(vals) >= 1, f"sweep.{k} must be a non-empty list")
    if "alpha" in cfg["partition"]:
        need(cfg["partition"]["alpha"] > 0, f"partition.alpha must be > 0 (got {cfg['partition']['alpha']}); "
             "small alpha = more label skew, try 0.1")
    dp = cfg["dp"]
    if dp["epsilon"] is not None or "dp.epsilon" in cfg["sweep"]:
        from fedsim.dp import validate_dp
        for eps in cfg["sweep"].get("dp.epsilon", [dp["epsilon"]]):
            if eps is not None:
                validate_dp(eps, dp["delta"], dp["max_grad_norm"], dp["accountant"])
    return cfg
