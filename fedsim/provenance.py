"""Where a number came from: git commit (and whether the tree was clean), device, CPU model and count, torch's
thread count, Python and library versions, written beside every run (env.json) and benchmark; for a run also the
backbone (its package version and weights' sha256) and the sha256 of every data file it read (`inputs`)."""
import functools
import hashlib
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from fedsim.tasks import REPO_ROOT


def cpu_has_native_bf16():
    """True where /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (Linux); None where it cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model():
    """The CPU's marketing name ("model name" in /proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _sha256(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    """sha256 of a file's bytes; computed once per process for an unchanged file (size and mtime as the key),
    so the many runs of one `make reproduce` hash each data file once."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def model_record(source, packages):
    """The backbone a run loaded: its directory's name (or hub id), the PyPI packages it came from with their versions, and the
    sha256 of its weight files (*.safetensors / *.bin), so a changed model release cannot pass unnoticed."""
    source = Path(source)
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    weights = sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin")) if source.is_dir() else []
    return {"source": source.name if source.is_dir() else str(source), "packages": versions, "weights_sha256": {w.name: file_sha256(w) for w in weights}}


def environment(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    libs = {}
    for pkg in ("torch", "transformers", "datasets", "peft", "opacus", "triton", "numpy", "pandas"):
        try:
            libs[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"git_commit": commit, "git_dirty": dirty, "device": str(device), "device_name": dev,
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "libraries": libs}
