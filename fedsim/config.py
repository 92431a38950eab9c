"""Experiment configuration: visible defaults, YAML files, `--set a.b=value` overrides, checked up front.

A config is a plain nested dict. Every key must exist in DEFAULTS (a typo is an error listing the valid
keys), except inside `method` (method parameters, checked by the method) and `partition` (partition
parameters, checked by the partition function). `validate` gives every key its declared type (TYPES;
numbers written as 1e-6, which YAML 1.1 reads as strings, become numbers) and rejects bad values, sweep
values included, with one ValueError naming the key and the fix, before any data or model is touched.

dp.epsilon: null = non-private (no clipping, no noise); a number > 0 = DP-SGD (or DP-FedAvg) calibrated to
that epsilon; .inf (`--set dp.epsilon=inf`) = clip only: the same DP schedule with noise multiplier 0,
the matched no-noise column of an epsilon sweep, e.g. sweep: {dp.epsilon: [.inf, 6, 3, 1]}.
"""
import copy
import itertools
import math
import re

import yaml

DEFAULTS = {
    "task": "sst2",
    "data_dir": None,            # else $FEDSIM_DATA, ../shared/data, the HF hub
    "max_length": 64,
    "padding": "longest",        # or max_length
    "train_subsample": None,     # rows of the train split (deterministic) for quick runs
    "dev_fraction": 0.0,         # hold out this share of the training rows as split "dev" (tuning), never trained on; the run is then scored on dev only
    "personal_eval_fraction": 0.0,  # hold out this share of each client's rows to score its own model (personalized accuracy)
    "eval_subsample": 1000,
    # evaluations before the last score only this many rows of each split (a keyed random subset, metrics
    # acc_<split>_curve; the last round scores it too, beside the whole split, and is the only one to score
    # personalized accuracy); None: every evaluation scores the whole split
    "curve_eval_subsample": None,
    "eval_splits": None,         # evaluation splits by metric name (mnli: [matched]); None = all of the task's
    "strip_metadata": False,     # 20 Newsgroups: drop headers/footers/quotes like scikit-learn
    "model": "all-MiniLM-L6-v2",
    "num_hidden_layers": None,   # keep the first k pretrained layers
    "pooling": "auto",           # mean | cls; auto = the backbone's own (sentence-transformers: mean)
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
    "server": {"optimizer": "fedavg",   # fedavg | fedavgm | fedadagrad | fedadam | fedyogi (server_optimizers.py)
               "lr": 1.0,               # server learning rate on the aggregate's update (1 with fedavg: plain FedAvg)
               "momentum": 0.9,         # FedAvgM's beta; FedAdagrad/FedAdam/FedYogi's beta1
               "beta2": 0.99, "tau": 1e-3},
    "dp": {"epsilon": None,            # null: non-private; .inf: clip only (the DP schedule with sigma = 0)
           "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "rdp",
           "max_batch_factor": 5.0,
           "head_share": None,       # per-group clipping: head to C*sqrt(share), adapters to C*sqrt(1-share)
           "unit": "sample",         # what epsilon protects: one training sample (DP-SGD) or one client's data (DP-FedAvg)
           "max_update_norm": 0.1,   # client unit: clip of each client's whole update (adaptive: its first value)
           "target_quantile": None,  # client unit: adaptive clipping toward this quantile of update norms; null = fixed
           "clip_lr": 0.2,           # client unit, adaptive: the clip's geometric learning rate (Andrew et al.)
           "clipped_count_stddev": None},  # client unit, adaptive: noise std of the clipped count; null = clients/20
    "seeds": [0],                # each seed is a federation in the same pass
    "sweep": {},                 # shape-preserving variants run as more federations, e.g. {"optimizer.lr": [0.01, 0.1]}
    "replica_chunk": None,       # replicas per forward/backward; None = all (GPU) / measured (CPU)
    "device": "auto",
    "precision": "auto",         # fp32 | bf16 (the frozen backbone's matmuls); auto = bf16 on CUDA, fp32 on CPU
}

SWEEPABLE = ("optimizer.lr", "lora.alpha", "dp.epsilon", "dp.max_grad_norm", "server.lr")
OPEN_SECTIONS = ("method", "partition")
OPTIMIZERS = ("sgd", "adamw")
# Keys that change how a run is computed but not its numbers (beyond float rounding): a run may resume
# under other values of these. Everything else must match the run being resumed (see `config_diff`).
RESULT_NEUTRAL = ("device", "replica_chunk", "eval_batch_size", "dp.max_batch_factor")
# Keys added after runs were first checkpointed, with their defaults (the behaviour the code had before the key
# existed): at that default a key enters neither the config hash nor the diff, so a run written before the key
# existed resumes under the code that has it, and its hash stays what it was.
ADDED_KEYS = {"curve_eval_subsample": None}

# Declared type of every key ("?" = may be null). int: an integer (10.0 and "1e3" are accepted when
# whole); float: a finite number; epsilon: a number or .inf, not NaN (dp.validate_dp checks the range);
# ints: a list of integers; floats2: a pair of numbers; targets: a list of module names or one string such
# as "all-linear".
TYPES = {
    "task": "str", "data_dir": "str?", "max_length": "int", "padding": "str", "train_subsample": "int?",
    "eval_subsample": "int?", "eval_splits": "strs?", "dev_fraction": "float", "personal_eval_fraction": "float", "strip_metadata": "bool", "model": "str", "num_hidden_layers": "int?", "pooling": "str",
    "curve_eval_subsample": "int?",
    "num_clients": "int", "client_fraction": "float", "rounds": "int", "local_steps": "int",
    "batch_size": "int", "eval_every": "int", "eval_batch_size": "int",
    "lora.rank": "int", "lora.alpha": "float", "lora.targets": "targets",
    "optimizer.name": "str", "optimizer.lr": "float", "optimizer.momentum": "float",
    "optimizer.weight_decay": "float", "optimizer.betas": "floats2", "optimizer.eps": "float",
    "server.optimizer": "str", "server.lr": "float", "server.momentum": "float", "server.beta2": "float",
    "server.tau": "float",
    "dp.epsilon": "epsilon?", "dp.delta": "float", "dp.max_grad_norm": "float", "dp.accountant": "str",
    "dp.max_batch_factor": "float", "dp.head_share": "float?", "dp.unit": "str", "dp.max_update_norm": "float",
    "dp.target_quantile": "float?", "dp.clip_lr": "float", "dp.clipped_count_stddev": "float?", "seeds": "ints", "replica_chunk": "int?", "device": "str",
    "precision": "str",
}
_KIND_TEXT = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a finite number",
              "epsilon": "a number > 0 or .inf (clipping without noise)",
              "ints": "a non-empty list of integers, e.g. [0, 1, 2]", "strs": "a non-empty list of names", "floats2": "a list of two numbers",
              "targets": "a list of module names, e.g. [query, value], or \"all-linear\""}


def set_path(cfg, dotted, value):
    keys = dotted.split(".")
    node, valid = cfg, DEFAULTS
    for i, k in enumerate(keys):
        open_section = i > 0 and keys[i - 1] in OPEN_SECTIONS and i == len(keys) - 1
        if not open_section and (not isinstance(valid, dict) or k not in valid):
            opts = sorted(valid) if isinstance(valid, dict) else []
            raise ValueError(f"unknown config key '{dotted}'; valid keys at that level: {opts}")
        if i == len(keys) - 1:
            if not open_section and isinstance(valid[k], dict) and not isinstance(value, dict):
                example = f"{dotted}.{next(iter(valid[k]), 'name')}=..." if valid[k] else f"{dotted}={{key: [values]}}"
                raise ValueError(f"'{dotted}' is a section, not a value (got {value!r}); set its keys, e.g. {example}")
            node[k] = value
        else:
            node, valid = node.setdefault(k, {}), valid[k]


def _merge(cfg, overrides, prefix=""):
    if not isinstance(overrides, dict):
        raise ValueError(f"a config must be a mapping of keys to values, got {type(overrides).__name__}: "
                         f"{str(overrides)[:60]!r}")
    for k, v in overrides.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and k not in OPEN_SECTIONS and k != "sweep" and "." not in k:
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
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                             f"quote it, e.g. \"seeds=[0,1]\"") from e
    return out


def load_config(path=None, overrides=None, base=None):
    """DEFAULTS (or base) <- the YAML file at path <- overrides ({dotted or nested key: value}), validated."""
    cfg = copy.deepcopy(base or DEFAULTS)
    if path:
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ValueError(f"config file {path} not found or not a file ({type(e).__name__}); "
                             f"pass an existing YAML file, e.g. --config configs/smoke.yaml") from e
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from e
        _merge(cfg, doc or {})
    _merge(cfg, copy.deepcopy(overrides or {}))
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


def flatten(cfg, prefix=""):
    """{dotted key: value} of a nested config (method/partition/sweep entries included)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old, new, ignore=RESULT_NEUTRAL):
    """['key: old -> new', ...] for every key whose value differs (keys in `ignore` excepted)."""
    a, b = ({**ADDED_KEYS, **flatten(c)} for c in (old, new))       # a key added since: absent = its default
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k, "(unset)") != b.get(k, "(unset)")]


def config_hash(cfg, ignore=RESULT_NEUTRAL):
    """Short hash of everything that determines a run's numbers (the keys in `ignore` excepted)."""
    import hashlib
    import json
    kept = {k: v for k, v in flatten(cfg).items()
            if k not in ignore and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- types and values

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|infinity|nan)$", re.IGNORECASE)


def _number(value):
    """A real number from an int/float or a numeric string ("1e-6"), else None; bools are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return None


def _typed(key, value, kind):
    """value converted to `kind` (see TYPES) or a ValueError naming the key, the expected and the given type."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    bad = ValueError(f"{key} must be {_KIND_TEXT[kind]}{' or null' if optional else ''}, got {value!r} "
                     f"({type(value).__name__})")
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind in ("int", "float"):
        x = _number(value)
        if x is None or not math.isfinite(x) or (kind == "int" and x != int(x)):
            raise bad
        return int(x) if kind == "int" else float(x)
    if kind == "epsilon":                 # .inf = clip only (sigma = 0); the sign is validate_dp's to refuse
        x = _number(value)
        if x is None or math.isnan(x):
            raise bad
        return float(x)
    if kind == "ints":
        if not isinstance(value, list) or not value:
            raise bad
        return [_typed(f"{key}[{i}]", v, "int") for i, v in enumerate(value)]
    if kind == "strs":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad
        return value
    if kind == "floats2":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise bad
        return [_typed(f"{key}[{i}]", v, "float") for i, v in enumerate(value)]
    if kind == "targets":
        if isinstance(value, str) and value:
            return value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad
        return value
    raise AssertionError(kind)


def _open_section_numbers(section):
    """Method/partition parameters: numeric strings ("1e-2") become numbers; the owner checks the rest."""
    out = dict(section)
    for k, v in section.items():
        if k != "name" and isinstance(v, str) and _number(v) is not None:
            out[k] = _number(v)
    return out


def validate(cfg):
    """Give every key its declared type and reject bad values (sweep values included), in place.

    Raises one ValueError naming the key and the fix, before any data or model is touched. The partition's
    own checks run here too (unknown or bad parameters fail now, not mid-run); the method's are
    methods.method_for's (the core never imports methods/: it checks a built method with check_method)."""
    for dotted, kind in TYPES.items():
        section, _, key = dotted.rpartition(".")
        node = cfg[section] if section else cfg
        node[key] = _typed(dotted, node[key], kind)
    for section in OPEN_SECTIONS:
        if not isinstance(cfg[section].get("name"), str):
            raise ValueError(f"{section}.name must be set, e.g. {section}.name="
                             f"{DEFAULTS[section]['name']} (got {cfg[section].get('name')!r})")
        cfg[section] = _open_section_numbers(cfg[section])
    if not isinstance(cfg["sweep"], dict):
        raise ValueError(f"sweep must be a mapping of sweepable keys to value lists, e.g. "
                         f"{{optimizer.lr: [0.01, 0.1]}} (got {cfg['sweep']!r})")
    for k, vals in cfg["sweep"].items():
        if k not in SWEEPABLE:
            raise ValueError(f"sweep key '{k}' does not keep tensor shapes; sweepable keys: {list(SWEEPABLE)}")
        if not isinstance(vals, list) or not vals:
            raise ValueError(f"sweep.{k} must be a non-empty list of values, e.g. [0.01, 0.1] (got {vals!r})")
        cfg["sweep"][k] = [_typed(f"sweep.{k}", v, TYPES[k]) for v in vals]
        if len(set(cfg["sweep"][k])) != len(vals):
            raise ValueError(f"sweep.{k} repeats a value ({vals}); each variant must be different")
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise ValueError(f"seeds repeat a value ({cfg['seeds']}); each federation needs its own seed")
    _check_values(cfg)
    eps = [v.get("dp.epsilon", cfg["dp"]["epsilon"]) for _, v in federations(cfg)]
    if any(e is None for e in eps) and any(e is not None for e in eps):
        raise ValueError("the dp.epsilon sweep mixes private (a number) and non-private (null) federations; "
                         "run them as two runs")
    if "dp.max_grad_norm" in cfg["sweep"] and all(e is None for e in eps):
        raise ValueError("sweep.dp.max_grad_norm needs a private run: set dp.epsilon (or sweep it)")
    variants = [v for seed, v in federations(cfg) if seed == cfg["seeds"][0]]    # the same for every seed
    for variant in variants:                         # every sweep value meets the same checks as the key
        if variant:
            one = copy.deepcopy(cfg)
            for k, v in variant.items():
                section, key = k.split(".")
                one[section][key] = v
            try:
                _check_values(one)
            except ValueError as e:
                raise ValueError(f"sweep value {variant}: {e}") from None
    return cfg


def _check_values(cfg):
    """Range and choice checks of a typed config (one federation's values)."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)
    from fedsim.tasks import get_task
    task = get_task(cfg["task"])                                     # unknown task: error listing the valid ones
    unknown = sorted(set(cfg["eval_splits"] or ()) - set(task.eval_splits))
    need(not unknown, f"eval_splits {unknown} are not evaluation splits of {task.name}; valid: "
                      f"{list(task.eval_splits)} (or null for all)")
    need(cfg["num_clients"] >= 1, f"num_clients must be >= 1 (got {cfg['num_clients']})")
    need(0 < cfg["client_fraction"] <= 1, f"client_fraction must be in (0, 1] (got {cfg['client_fraction']})")
    need(cfg["local_steps"] >= 1, f"local_steps (K) must be >= 1 (got {cfg['local_steps']})")
    need(cfg["rounds"] >= 1, f"rounds must be >= 1 (got {cfg['rounds']})")
    need(cfg["batch_size"] >= 1, f"batch_size must be >= 1 (got {cfg['batch_size']})")
    need(cfg["eval_every"] >= 1, f"eval_every must be >= 1 (got {cfg['eval_every']})")
    need(cfg["eval_batch_size"] >= 1, f"eval_batch_size must be >= 1 (got {cfg['eval_batch_size']})")
    need(cfg["max_length"] >= 2, f"max_length must be >= 2 tokens (got {cfg['max_length']}): [CLS] and [SEP] "
         "alone take 2; try 64 or 128")
    for key in ("train_subsample", "eval_subsample", "curve_eval_subsample"):
        need(cfg[key] is None or cfg[key] >= 1, f"{key} must be a positive number of rows or null (got {cfg[key]})")
    need(cfg["num_hidden_layers"] is None or cfg["num_hidden_layers"] >= 1,
         f"num_hidden_layers must be >= 1 or null for all layers (got {cfg['num_hidden_layers']})")
    need(cfg["replica_chunk"] is None or cfg["replica_chunk"] >= 1,
         f"replica_chunk must be >= 1 or null to choose automatically (got {cfg['replica_chunk']})")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg["device"]) is not None,
         f"device must be auto, cpu, cuda, cuda:N or mps (got {cfg['device']!r})")
    need(cfg["precision"] in ("auto", "fp32", "bf16"),
         f"precision must be auto, fp32 or bf16 (got {cfg['precision']!r})")
    need(not cfg["strip_metadata"] or task.name == "20news",
         f"strip_metadata applies to 20news only, not {task.name}; drop it or set strip_metadata=false")
    need(min(cfg["seeds"]) >= 0, f"seeds must be >= 0 (got {cfg['seeds']})")
    need(cfg["lora"]["rank"] >= 1, f"lora.rank must be >= 1 (got {cfg['lora']['rank']}); LoRA needs a positive rank")
    need(cfg["lora"]["alpha"] > 0, f"lora.alpha must be > 0 (got {cfg['lora']['alpha']}); the scale is alpha / rank")
    opt = cfg["optimizer"]
    need(opt["name"] in OPTIMIZERS, f"unknown optimizer.name '{opt['name']}'; valid: {list(OPTIMIZERS)}")
    need(opt["lr"] > 0, f"optimizer.lr must be > 0 (got {opt['lr']})")
    need(0 <= opt["momentum"] < 1, f"optimizer.momentum must be in [0, 1) (got {opt['momentum']})")
    need(opt["weight_decay"] >= 0, f"optimizer.weight_decay must be >= 0 (got {opt['weight_decay']})")
    need(opt["eps"] > 0, f"optimizer.eps must be > 0 (got {opt['eps']}); AdamW's default is 1e-8")
    need(all(0 <= b < 1 for b in opt["betas"]), f"optimizer.betas must be in [0, 1) (got {opt['betas']}); "
         "AdamW's default is [0.9, 0.999]")
    need(0 <= cfg["personal_eval_fraction"] < 0.5, f"personal_eval_fraction must be in [0, 0.5) (got "
                                                    f"{cfg['personal_eval_fraction']}); e.g. 0.2 holds out a fifth "
                                                    f"of each client's rows to score its own model")
    need(0 <= cfg["dev_fraction"] < 0.5, f"dev_fraction must be in [0, 0.5) (got {cfg['dev_fraction']}); it is the "
                                          f"share of training rows held out for tuning, e.g. 0.15")
    need(cfg["pooling"] in ("auto", "mean", "cls"), f"pooling must be auto, mean or cls (got {cfg['pooling']!r}); "
                                                    f"auto uses the backbone's own convention")
    need(cfg["padding"] in ("longest", "max_length"), f"padding must be 'longest' or 'max_length' (got {cfg['padding']})")
    server = cfg["server"]
    from fedsim.server_optimizers import validate_server                # the server optimizer's own checks
    validate_server(**{k: v for k, v in server.items() if k != "optimizer"}, name=server["optimizer"])
    dp = cfg["dp"]
    need(dp["head_share"] is None or 0 < dp["head_share"] < 1, f"dp.head_share must be in (0, 1) or null for joint "
                                                             f"clipping (got {dp['head_share']}); try 0.1")
    need(dp["max_batch_factor"] > 0, f"dp.max_batch_factor must be > 0 (got {dp['max_batch_factor']}); try 5.0")
    if dp["epsilon"] is not None:
        from fedsim.dp import validate_dp
        validate_dp(dp["epsilon"], dp["delta"], dp["max_grad_norm"], dp["accountant"])
    need(dp["unit"] in ("sample", "client"), f"dp.unit must be sample (DP-SGD: epsilon protects one training "
                                              f"sample) or client (DP-FedAvg: one client's data), got {dp['unit']!r}")
    if dp["unit"] == "client":
        from fedsim.sampling import clients_per_round
        need(dp["max_update_norm"] > 0, f"dp.max_update_norm must be > 0 (got {dp['max_update_norm']}); try 0.1")
        need(dp["target_quantile"] is None or 0 < dp["target_quantile"] < 1, f"dp.target_quantile must be in (0, 1) "
             f"or null for fixed clipping (got {dp['target_quantile']}); Andrew et al. use 0.5")
        need(dp["clip_lr"] > 0, f"dp.clip_lr must be > 0 (got {dp['clip_lr']}); Andrew et al. use 0.2")
        need(dp["clipped_count_stddev"] is None or dp["clipped_count_stddev"] > 0, f"dp.clipped_count_stddev must be "
             f"> 0 or null for clients per round / 20 (got {dp['clipped_count_stddev']})")
        need(dp["head_share"] is None, "dp.head_share splits a per-sample clip: it applies to dp.unit=sample; drop it")
        need("dp.max_grad_norm" not in cfg["sweep"], "sweep.dp.max_grad_norm: client-level DP clips updates to dp.max_update_norm")
        if dp["epsilon"] is not None or "dp.epsilon" in cfg["sweep"]:
            need(clients_per_round(cfg["num_clients"], cfg["client_fraction"]) < cfg["num_clients"],
                 f"client-level DP with client_fraction {cfg['client_fraction']} samples every client each round (q = 1, "
                 f"no amplification): set client_fraction below 1 (q = clients per round / clients) or dp.unit=sample")
    import partitions
    params = {k: v for k, v in cfg["partition"].items() if k != "name"}
    partitions.validate(cfg["partition"]["name"], cfg["num_clients"], cfg["seeds"][0], **params)


def check_method(cfg, method):
    """What a validated config asks of its method (a fedsim.interface.Method, built from cfg["method"] and
    cfg["lora"]) that the method cannot do: a server optimizer, client-level DP. One ValueError naming the fix."""
    server, dp = cfg["server"], cfg["dp"]
    plain_server = server["optimizer"] == "fedavg" and server["lr"] == 1 and "server.lr" not in cfg["sweep"]
    if not plain_server and method.server_optimizer_unsupported is not None:
        raise ValueError(f"a server optimizer ({server['optimizer']}, lr {server['lr']}) does not apply to method "
                         f"{method.name}: {method.server_optimizer_unsupported}; use server.optimizer=fedavg with "
                         f"server.lr=1")
    private = dp["epsilon"] is not None or "dp.epsilon" in cfg["sweep"]
    if dp["unit"] == "client" and private and method.client_dp_unsupported is not None:
        raise ValueError(f"client-level DP cannot protect method {method.name}: {method.client_dp_unsupported}; "
                         f"use dp.unit=sample")
