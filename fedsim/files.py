"""Atomic file writes: every file fedsim writes goes to a temporary name beside its target, then is renamed
over it, so a process killed mid-write leaves the previous file intact and a concurrent reader (runs sharing
a tokenization or chunk cache) sees either the old file or the new one, never half of one."""
import os
from pathlib import Path


def atomic_write(path, write):
    """write(tmp) fills a temporary file, which then replaces `path`. The temporary name carries the process id:
    two processes writing the same path never share one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    atomic_write(path, lambda tmp: tmp.write_text(text))
