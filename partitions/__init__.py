"""Heterogeneity splits of a dataset over federated clients.

Every partition takes the label array, the number of clients and a seed, and returns one sorted
index array per client; together they cover every sample exactly once, except `label_mix` (the FFA-LoRA
paper's fixed label mixtures), which draws the rows its mixtures need and leaves the rest out (no sample
twice). Bad arguments raise ValueError before any work, saying what to change.
"""
import inspect
import math

import numpy as np

from fedsim.rng import numpy_rng
from partitions.report import partition_table, plot_partition_heatmap  # noqa: F401

MAX_TRIES = 1000  # Dirichlet redraws before giving up on min_samples


# ----------------------------------------------------------------------------- argument checks

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


_RULES = {
    "num_clients": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "alpha": (lambda v: _is_num(v) and v > 0, "a finite number > 0 (smaller = more label skew)"),
    "min_samples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "labels_per_client": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "distribution": (lambda v: v in ("lognormal", "powerlaw"), "'lognormal' or 'powerlaw'"),
    "sigma": (lambda v: _is_num(v) and v > 0, "a finite number > 0 (use iid for equal sizes)"),
    "exponent": (lambda v: _is_num(v) and v > 0, "a finite number > 0 (use iid for equal sizes)"),
    "mixtures": (lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(m, (list, tuple)) and len(m) == len(v[0]) and all(_is_num(p) and p >= 0 for p in m)
        and abs(sum(m) - 1) < 1e-6 for m in v)),
                 "null (the paper's defaults) or a list of label mixtures of one length, each of numbers >= 0 "
                 "summing to 1, e.g. [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]"),
}


def _check(**kwargs):
    for k, v in kwargs.items():
        ok, want = _RULES[k]
        if not ok(v):
            raise ValueError(f"{k} must be {want}, got {v!r}")


def _check_labels(labels, num_clients, min_samples=1) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0; drop unlabeled (-1) rows before partitioning")
    if num_clients * max(min_samples, 1) > labels.size:
        raise ValueError(f"{num_clients} clients x {max(min_samples, 1)} samples each needs more than the "
                         f"{labels.size} samples available; lower num_clients (or min_samples)")
    return labels


def _finish(assign: np.ndarray, num_clients: int) -> list:
    """Client id per sample -> sorted index array per client."""
    order = np.argsort(assign, kind="stable")
    return np.split(order, np.cumsum(np.bincount(assign, minlength=num_clients))[:-1])


# ----------------------------------------------------------------------------- partitions

def iid(labels, num_clients, seed=0) -> list:
    """Uniform random split into near-equal sizes (differ by at most one)."""
    _check(num_clients=num_clients, seed=seed)
    labels = _check_labels(labels, num_clients)
    perm = numpy_rng(seed, "partition", "iid").permutation(labels.size)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet_label_skew(labels, num_clients, alpha, seed=0, min_samples=2) -> list:
    """Per class, client shares ~ Dirichlet(alpha): small alpha = few classes per client.

    Plain per-class allocation (Hsu et al. 2019), no size balancing. Proportions are redrawn until
    every client holds >= min_samples (at most MAX_TRIES times)."""
    _check(num_clients=num_clients, alpha=alpha, seed=seed, min_samples=min_samples)
    labels = _check_labels(labels, num_clients, min_samples)
    rng = numpy_rng(seed, "partition", "dirichlet")
    classes = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(MAX_TRIES):
        # cut points of each shuffled class: client j gets the slice between cuts j-1 and j
        cuts = [(np.cumsum(rng.dirichlet(np.full(num_clients, float(alpha)))) * len(idx)).astype(np.int64)
                for idx in classes]
        for cut, idx in zip(cuts, classes):
            cut[-1] = len(idx)  # float round-off must not drop the last sample
        sizes = sum(np.diff(cut, prepend=0) for cut in cuts)
        if sizes.min() >= min_samples:
            break
    else:
        raise ValueError(f"dirichlet: no draw in {MAX_TRIES} gave every one of {num_clients} clients >= "
                         f"{min_samples} samples at alpha={alpha}; raise alpha or lower num_clients/min_samples")
    assign = np.empty(labels.size, dtype=np.int64)
    for cut, idx in zip(cuts, classes):
        assign[idx] = np.repeat(np.arange(num_clients), np.diff(cut, prepend=0))
    return _finish(assign, num_clients)


def shards(labels, num_clients, labels_per_client, seed=0) -> list:
    """Pathological split: each client holds exactly `labels_per_client` distinct labels.

    Clients take consecutive windows of a cycled random label order, so labels are shared by as
    equal a number of clients as possible; each label's samples are split evenly among its holders."""
    _check(num_clients=num_clients, labels_per_client=labels_per_client, seed=seed)
    labels = _check_labels(labels, num_clients)
    classes, counts = np.unique(labels, return_counts=True)
    k, L = labels_per_client, len(classes)
    if k > L:
        raise ValueError(f"labels_per_client={k} exceeds the {L} labels present; lower labels_per_client")
    if num_clients * k < L:
        raise ValueError(f"{num_clients} clients x {k} labels cannot cover all {L} labels, so samples would be "
                         f"dropped; raise num_clients or labels_per_client to >= {math.ceil(L / num_clients)}")
    rng = numpy_rng(seed, "partition", "shards")
    order = rng.permutation(L)
    held = order[(np.arange(num_clients)[:, None] * k + np.arange(k)) % L]  # [clients, k] label positions
    holders = [np.flatnonzero((held == c).any(1)) for c in range(L)]
    short = [(classes[c], counts[c], len(h)) for c, h in enumerate(holders) if counts[c] < len(h)]
    if short:
        raise ValueError(f"labels with fewer samples than clients holding them (label, samples, clients): {short}; "
                         f"lower num_clients or labels_per_client")
    assign = np.empty(labels.size, dtype=np.int64)
    for c, h in enumerate(holders):
        idx = rng.permutation(np.flatnonzero(labels == classes[c]))
        for client, part in zip(rng.permutation(h), np.array_split(idx, len(h))):
            assign[part] = client
    return _finish(assign, num_clients)


def _apportion(weights: np.ndarray, total: int, minimum: int) -> np.ndarray:
    """Integer sizes >= minimum summing to total, proportional to weights (largest remainder)."""
    raw = weights / weights.sum() * (total - minimum * len(weights))
    sizes = np.floor(raw).astype(np.int64)
    extra = total - minimum * len(weights) - sizes.sum()
    sizes[np.argsort(-(raw - sizes), kind="stable")[:extra]] += 1
    return sizes + minimum


def quantity_skew(labels, num_clients, seed=0, distribution="lognormal", sigma=1.0, exponent=1.0,
                  min_samples=1) -> list:
    """Skewed client sizes, labels iid within a client.

    lognormal: size ~ LogNormal(0, sigma). powerlaw: Zipf-like, the client of random rank r gets
    size ~ r^-exponent (so max/min ~ num_clients^exponent). Every client gets >= min_samples."""
    _check(num_clients=num_clients, seed=seed, distribution=distribution, sigma=sigma, exponent=exponent,
           min_samples=min_samples)
    labels = _check_labels(labels, num_clients, min_samples)
    rng = numpy_rng(seed, "partition", "quantity", distribution)
    if distribution == "lognormal":
        weights = rng.lognormal(0.0, sigma, num_clients)
    else:
        weights = rng.permutation(np.arange(1, num_clients + 1, dtype=float) ** -float(exponent))
    sizes = _apportion(weights, labels.size, min_samples)
    perm = rng.permutation(labels.size)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def default_mixtures(num_labels: int) -> list:
    """The FFA-LoRA paper's client label mixtures (arXiv 2403.12313, its non-IID GLUE setting): on 2-label
    tasks [0.1, 0.9], [0.9, 0.1], [0.5, 0.5]; on L >= 3 labels client j holds 90% of label j and spreads 10%
    evenly over the others ([0.9, 0.05, 0.05] rotated on 3-label tasks), L mixtures."""
    if num_labels == 2:
        return [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
    if num_labels == 1:
        return [[1.0]]
    rest = 0.1 / (num_labels - 1)
    return [[0.9 if c == j else rest for c in range(num_labels)] for j in range(num_labels)]


def label_mix(labels, num_clients, seed=0, mixtures=None) -> list:
    """Fixed label mixtures per client, the FFA-LoRA paper's split (not Dirichlet).

    Client j follows mixture p_j = mixtures[j mod M] (default: `default_mixtures` for the labels' count).
    Every client gets the same size n, the largest for which the labels' rows suffice: per client the n rows
    are apportioned over labels by p_j (largest remainder, so k_jc sums to n), and n is lowered until
    sum_j k_jc <= count_c for every label c. Each label's rows are shuffled (keyed by the seed) and dealt to the
    clients in client order; rows no mixture needs are left out (e.g. SST-2's surplus of positive sentences)."""
    _check(num_clients=num_clients, seed=seed, mixtures=mixtures)
    labels = _check_labels(labels, num_clients)
    L = int(labels.max()) + 1
    mix = np.asarray(mixtures if mixtures is not None else default_mixtures(L), dtype=np.float64)
    if mix.shape[1] != L:
        raise ValueError(f"label_mix: mixtures have {mix.shape[1]} entries but the labels have {L} ids; "
                         f"give one proportion per label id (or mixtures: null for the paper's defaults)")
    mix = mix[np.arange(num_clients) % len(mix)]                         # [clients, L]
    counts = np.bincount(labels, minlength=L)

    def plan(n):                                                          # [clients, L] rows per client and label
        return np.stack([_apportion(p, n, 0) for p in mix])

    demand = mix.sum(0)
    n = int(min(counts[c] / demand[c] for c in range(L) if demand[c] > 0))
    while n > 0 and (plan(n).sum(0) > counts).any():
        n -= 1
    if n < 1:
        raise ValueError(f"label_mix: the labels' counts {counts.tolist()} cannot give {num_clients} clients even "
                         f"one row each at these mixtures; lower num_clients or change the mixtures")
    k = plan(n)
    rng = numpy_rng(seed, "partition", "label_mix")
    parts = [[] for _ in range(num_clients)]
    for c in range(L):
        rows = rng.permutation(np.flatnonzero(labels == c))
        for j, piece in enumerate(np.split(rows[:k[:, c].sum()], np.cumsum(k[:, c])[:-1])):
            parts[j].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


# ----------------------------------------------------------------------------- registry

PARTITIONS = {"iid": iid, "dirichlet": dirichlet_label_skew, "shards": shards, "quantity": quantity_skew,
              "label_mix": label_mix}
ALIASES = {"dirichlet_label_skew": "dirichlet", "label_skew": "dirichlet", "pathological": "shards",
           "quantity_skew": "quantity", "ffa_paper": "label_mix"}
# Partitions that leave rows out by design (the rest cover every sample exactly once)
SUBSETTING = ("label_mix",)


def partition_params(name: str) -> tuple:
    """Extra parameter names a partition accepts (besides labels, num_clients, seed)."""
    fn = PARTITIONS[ALIASES.get(name, name)]
    return tuple(p for p in inspect.signature(fn).parameters if p not in ("labels", "num_clients", "seed"))


def validate(name: str, num_clients, seed=0, **params) -> str:
    """Check a partition name and its arguments without any data; returns the canonical name."""
    key = ALIASES.get(name, name)
    if key not in PARTITIONS:
        raise ValueError(f"unknown partition {name!r}; valid: {sorted(PARTITIONS)} (aliases: {sorted(ALIASES)})")
    sig = inspect.signature(PARTITIONS[key]).parameters
    valid = partition_params(key)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"partition {key!r} takes no parameter(s) {unknown}; valid: {list(valid)}")
    missing = [p for p in valid if sig[p].default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"partition {key!r} needs parameter(s) {missing}")
    _check(num_clients=num_clients, seed=seed, **params)
    return key


def make_partition(name: str, labels, num_clients, seed=0, **params) -> list:
    """Partition by registry name, e.g. make_partition("dirichlet", y, 10, 0, alpha=0.1)."""
    key = validate(name, num_clients, seed, **params)
    return PARTITIONS[key](labels, num_clients, seed=seed, **params)


def hold_out(parts, fraction, seed):
    """Split every client's rows into (train, held out): round(fraction x its rows) drawn from a generator keyed
    by the seed and the client, at most all but one row (a client always trains). Returns (train parts, held-out
    parts), each a list of sorted index arrays; fraction 0 holds out nothing. The held-out rows score each
    client's own model (personalized accuracy)."""
    train, held = [], []
    for c, part in enumerate(parts):
        part = np.asarray(part)
        n = min(int(round(fraction * len(part))), max(len(part) - 1, 0))
        order = numpy_rng(seed, "personal_eval", c).permutation(len(part))
        held.append(np.sort(part[order[:n]]))
        train.append(np.sort(part[order[n:]]))
    return train, held


def dev_split(num_rows, dev_fraction):
    """(train rows sorted, dev rows in random order): round(dev_fraction * num_rows) rows held out by a
    fixed key (the same for every seed and variant, so tuning compares every candidate on the same rows).
    Evaluation reads the first eval_subsample dev rows: a random subset of the held-out rows."""
    n_dev = int(round(dev_fraction * num_rows))
    perm = numpy_rng("dev split", num_rows).permutation(num_rows)
    return np.sort(perm[n_dev:]), perm[:n_dev]
