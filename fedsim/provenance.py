"""Where a number came from: git commit (and whether the tree was clean), device, CPU count, Python and library
versions, written beside every run (env.json) and benchmark."""
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


def environment(device):
    import importlib.metadata as md
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
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"git_commit": commit, "git_dirty": dirty, "device": str(device), "device_name": dev,
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "libraries": libs}
