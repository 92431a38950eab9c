"""Seeded randomness keyed by (run seed, purpose, round, client, ...).

Every random draw in fedsim (and in the sequential reference) comes from a generator made here, so two
runs with the same config are bitwise identical and the engine and the reference see the same streams.
"""
import hashlib

import numpy as np
import torch


def derive_seed(*keys) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and platforms)."""
    # numpy ints repr as 'np.int64(3)': normalise so 3 and np.int64(3) give the same stream
    keys = tuple(int(k) if isinstance(k, np.integer) else k for k in keys)
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def numpy_rng(*keys) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*keys))


def torch_generator(*keys, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g
