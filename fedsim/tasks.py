"""Task registry and data loading: local parquet copies first, the Hugging Face hub last.

Data is looked up in order: the `data_dir` argument, $FEDSIM_DATA, ../shared/data next to the repo,
then the hub (only when reachable). Tokenized splits are cached on disk as torch tensors.
"""
import hashlib
import json
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from fedsim.files import atomic_write
from fedsim.rng import numpy_rng

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "tokenized"
CACHE_VERSION = 1  # bump when tokenization changes, so stale caches are never reused


class DataNotFoundError(FileNotFoundError):
    pass


class DataReadError(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple
    label_names: tuple
    train_split: str
    eval_splits: dict  # metric name -> split file stem
    subdir: str
    hub_id: str
    hub_config: str | None = None
    extra_splits: tuple = ()  # unlabeled splits (all labels -1), returned as they are

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def splits(self) -> tuple:
        return (self.train_split, *self.eval_splits.values(), *self.extra_splits)


NEWSGROUPS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
    "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
    "talk.religion.misc")

TASKS = {
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "train",
                     {"matched": "validation_matched", "mismatched": "validation_mismatched"},
                     "mnli", "nyu-mll/glue", "mnli"),
    "sst2": TaskSpec("sst2", ("sentence",), ("negative", "positive"), "train", {"validation": "validation"},
                     "sst2", "nyu-mll/glue", "sst2", extra_splits=("test",)),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "train",
                    {"validation": "validation"}, "rte", "nyu-mll/glue", "rte", extra_splits=("test",)),
    "20news": TaskSpec("20news", ("text",), NEWSGROUPS, "train", {"test": "test"}, "20news",
                       "SetFit/20_newsgroups"),
}
ALIASES = {"20newsgroups": "20news", "20_newsgroups": "20news", "newsgroups": "20news", "sst-2": "sst2",
           "multinli": "mnli"}


def get_task(name) -> TaskSpec:
    if isinstance(name, TaskSpec):
        return name
    key = str(name).lower().strip()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {sorted(TASKS)} (aliases: {sorted(ALIASES)})")
    return TASKS[key]


def resolve_split(task, split: str) -> str:
    """File stem of a split; eval metric names ("matched") are accepted too."""
    spec = get_task(task)
    stem = spec.eval_splits.get(split, split)
    if stem not in spec.splits:
        raise ValueError(f"task {spec.name} has no split {split!r}; valid: {list(spec.splits)} "
                         f"(or eval names {list(spec.eval_splits)})")
    return stem


# ----------------------------------------------------------------------------- locating the data

def hub_reachable(timeout: float = 2.0) -> bool:
    """True only if the hub is not switched off and its host answers quickly (never hang offline)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def find_split_file(task, split: str, data_dir=None):
    """Local parquet path of (task, split); None means "use the hub".

    An explicit location (the data_dir argument, else $FEDSIM_DATA) is the only place looked: a typo there
    is an error, never a silent fallback to other data. Without one: ../shared/data, then the hub. Raises
    DataNotFoundError listing every place looked when nothing is found."""
    spec, stem = get_task(task), resolve_split(task, split)
    if data_dir is not None:
        places = [("data_dir", Path(data_dir))]
    elif os.environ.get("FEDSIM_DATA"):
        places = [("$FEDSIM_DATA", Path(os.environ["FEDSIM_DATA"]))]
    else:
        places = [("default <repo>/../shared/data", DEFAULT_DATA_DIR)]
    tried = []
    for what, root in places:
        path = root / spec.subdir / f"{stem}.parquet"
        if path.is_file():
            return path
        tried.append(f"{what}: {path} (missing)")
    explicit = places[0][0] != "default <repo>/../shared/data"
    if not explicit and hub_reachable():
        return None
    if not explicit:
        tried.append(f"Hugging Face hub {spec.hub_id}" + (f" ({spec.hub_config})" if spec.hub_config else "")
                     + ": not reachable (offline or HF_HUB_OFFLINE set)")
    raise DataNotFoundError(
        f"no data for task {spec.name!r} split {stem!r}; looked in " + "; ".join(tried) +
        f". Fix: point data_dir (or $FEDSIM_DATA) at a directory holding {spec.subdir}/{stem}.parquet, "
        f"or unset it to use ../shared/data (see ../shared/data/README.md)")


def _bad_file(path, e, what="") -> DataReadError:
    return DataReadError(f"cannot read {path}: {type(e).__name__}: {e}. The file is corrupt or truncated{what}; "
                         f"restore it from the dataset source (see ../shared/data/README.md).")


def _read_parquet(path: Path, columns) -> pd.DataFrame:
    try:
        return pq.read_table(path, columns=list(columns)).to_pandas()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, KeyError... for bad files
        raise _bad_file(path, e, f", or lacks columns {list(columns)}") from e


def file_label_names(path: Path):
    """label_names from the parquet schema metadata (or 20news' label_names.json), None if absent."""
    try:
        md = pq.read_schema(path).metadata or {}
    except Exception as e:
        raise _bad_file(path, e) from e
    if b"label_names" in md:
        return tuple(json.loads(md[b"label_names"]))
    sidecar = path.parent / "label_names.json"
    if sidecar.is_file():
        return tuple(json.loads(sidecar.read_text())["label_names"])
    return None


def _load_hub(spec: TaskSpec, stem: str) -> pd.DataFrame:
    # SetFit/20_newsgroups may differ from the local bydate copy (row order, cleaning): do not mix sources.
    import datasets
    ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=stem)
    return ds.to_pandas()


# ----------------------------------------------------------------------------- rows

def _select_rows(labels: np.ndarray, spec: TaskSpec, stem: str, subsample, seed) -> np.ndarray:
    """Row positions kept: labeled rows (train/eval splits), then a seeded uniform subset.

    Uniform rather than stratified: the subset keeps the split's label mix in expectation and needs
    no label-specific logic. Rows stay in corpus order."""
    keep = np.arange(len(labels)) if stem in spec.extra_splits else np.flatnonzero(labels != -1)
    if subsample is not None:
        if int(subsample) < 1:
            raise ValueError(f"subsample must be a positive number of rows, got {subsample}")
        if subsample < len(keep):
            rng = numpy_rng(seed, "subsample", spec.name, stem)
            keep = np.sort(rng.choice(keep, size=int(subsample), replace=False))
    return keep


def load_split(task, split, data_dir=None, subsample=None, seed=0, strip_metadata=False) -> pd.DataFrame:
    """DataFrame with the task's text columns and `label` (int64), index 0..N-1.

    Rows with label -1 are dropped from train/eval splits (kept in the unlabeled GLUE test splits).
    `subsample`: a seeded uniform subset of that many rows (all rows if the split is smaller).
    `strip_metadata` (20news only): remove headers, footers and quotes as scikit-learn does."""
    spec, stem = get_task(task), resolve_split(task, split)
    path = find_split_file(spec, stem, data_dir)
    columns = [*spec.text_fields, "label"]
    if path is None:
        df = _load_hub(spec, stem)[columns]
    else:
        names = file_label_names(path)
        if names is not None and tuple(names) != spec.label_names:
            raise DataReadError(f"{path}: label_names {list(names)} differ from the expected "
                                f"{list(spec.label_names)}; label ids would be misread")
        df = _read_parquet(path, columns)
    labels = df["label"].to_numpy()
    df = df.iloc[_select_rows(labels, spec, stem, subsample, seed)].reset_index(drop=True)
    df["label"] = df["label"].astype(np.int64)
    if strip_metadata:
        if spec.name != "20news":
            raise ValueError(f"strip_metadata applies to 20news only, not {spec.name}")
        df["text"] = [strip_newsgroup_quoting(strip_newsgroup_footer(strip_newsgroup_header(t)))
                      for t in df["text"]]
    df.attrs["label_names"] = list(spec.label_names)
    df.attrs["source"] = str(path) if path is not None else f"hub:{spec.hub_id}"
    return df


def load_labels(task, split=None, data_dir=None, subsample=None, seed=0) -> np.ndarray:
    """int64 labels of a split (default: train) without reading the text; same rows and order as
    load_split / load_tokenized with the same subsample and seed."""
    spec = get_task(task)
    stem = resolve_split(spec, split or spec.train_split)
    path = find_split_file(spec, stem, data_dir)
    labels = (_load_hub(spec, stem) if path is None else _read_parquet(path, ["label"]))["label"].to_numpy()
    return labels[_select_rows(labels, spec, stem, subsample, seed)].astype(np.int64)


# ----------------------------------------------------------------------------- 20news cleaning
# Reimplementation of scikit-learn's fetch_20newsgroups(remove=('headers', 'footers', 'quotes'));
# applied in sklearn's order: headers, then footers, then quotes.

_QUOTE_RE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_newsgroup_header(text: str) -> str:
    """Everything before the first blank line is the header."""
    _before, _blank, after = text.partition("\n\n")
    return after


def strip_newsgroup_quoting(text: str) -> str:
    """Drop lines quoting another post ('>' or '|') or introducing a quote ('... writes:')."""
    return "\n".join(line for line in text.split("\n") if not _QUOTE_RE.search(line))


def strip_newsgroup_footer(text: str) -> str:
    """Drop the signature: everything after the last blank or all-hyphen line."""
    lines = text.strip().split("\n")
    for line_num in range(len(lines) - 1, -1, -1):
        if lines[line_num].strip().strip("-") == "":
            break
    return "\n".join(lines[:line_num]) if line_num > 0 else text


# ----------------------------------------------------------------------------- tokenization

def _cache_key(spec, stem, tokenizer, max_length, padding, subsample, seed, strip, source) -> str:
    src = source
    if source is not None:  # a changed data file must not hit an old cache
        st = Path(source).stat()
        src = (str(Path(source).resolve()), st.st_size, st.st_mtime_ns)
    key = (CACHE_VERSION, spec.name, stem, tokenizer.name_or_path, len(tokenizer), type(tokenizer).__name__,
           max_length, padding, subsample, seed, bool(strip), src)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:20]


def _pad(rows, T: int, value: int, left: bool) -> torch.Tensor:
    out = np.full((len(rows), T), value, dtype=np.int64)
    for i, r in enumerate(rows):
        if left:
            out[i, T - len(r):] = r
        else:
            out[i, :len(r)] = r
    return torch.from_numpy(out)


def load_tokenized(task, split, tokenizer, max_length=128, padding="max_length", data_dir=None,
                   subsample=None, seed=0, strip_metadata=False, cache_dir=None) -> dict:
    """Tokenized split as tensors: input_ids, attention_mask [N, T] (token_type_ids [N, T] if the
    tokenizer makes them) and labels [N]. T = max_length, or the longest sequence in the split with
    padding="longest". Cached on disk ($FEDSIM_CACHE or <repo>/.cache/tokenized)."""
    if padding not in ("max_length", "longest"):
        raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    if int(max_length) < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    spec, stem = get_task(task), resolve_split(task, split)
    source = find_split_file(spec, stem, data_dir)
    cache_dir = Path(cache_dir or os.environ.get("FEDSIM_CACHE") or DEFAULT_CACHE_DIR)
    key = _cache_key(spec, stem, tokenizer, max_length, padding, subsample, seed, strip_metadata, source)
    path = cache_dir / f"{spec.name}_{stem}_{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # a torn write from a killed run: re-tokenize instead of failing
            warnings.warn(f"ignoring unreadable cache {path}: {e}")

    import datasets
    df = load_split(spec, stem, data_dir=data_dir, subsample=subsample, seed=seed, strip_metadata=strip_metadata)
    fields = spec.text_fields

    def encode(batch):
        texts = [batch[f] for f in fields]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    ds = datasets.Dataset.from_pandas(df, preserve_index=False)
    ds = ds.map(encode, batched=True, batch_size=1000, remove_columns=list(fields), desc=f"tokenize {spec.name}/{stem}")
    lengths = [len(r) for r in ds["input_ids"]]
    T = max_length if padding == "max_length" else max(lengths, default=1)
    left = tokenizer.padding_side == "left"
    out = {"input_ids": _pad(ds["input_ids"], T, tokenizer.pad_token_id, left),
           "attention_mask": _pad(ds["attention_mask"], T, 0, left)}
    if "token_type_ids" in ds.column_names:
        out["token_type_ids"] = _pad(ds["token_type_ids"], T, tokenizer.pad_token_type_id, left)
    out["labels"] = torch.tensor(ds["label"], dtype=torch.long)

    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(out, tmp))   # concurrent runs never see a half-written cache
    return out
