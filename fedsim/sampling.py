"""Who trains and on what: client sampling per round and batch sampling per local step.

Shared by the engine and the sequential reference (this is "the seeds" they share). Positions returned
index into a client's own index array (its partition), not into the dataset.

Every stream is keyed by the federation's seed and its purpose (round, client), never by where the
federation sits in a pass: a federation run among others draws exactly what it draws alone, and the
sweep variants of one seed draw the same clients and batches (common random numbers).
"""
import numpy as np

from fedsim.rng import numpy_rng


class PoissonOverflowError(RuntimeError):
    """A Poisson batch drew more samples than the static padded size (a rare event, not a bug)."""


def sample_clients(num_clients: int, fraction: float, seed: int, round_idx: int) -> np.ndarray:
    """Sorted ids of the clients taking part in a round: clients_per_round(n, fraction) of them."""
    m = clients_per_round(num_clients, fraction)
    if m == num_clients:
        return np.arange(num_clients)
    rng = numpy_rng(seed, "clients", round_idx)
    return np.sort(rng.choice(num_clients, size=m, replace=False))


def clients_per_round(num_clients: int, fraction: float) -> int:
    """round(fraction * n) clients take part in each round, at least one and at most all n."""
    return min(num_clients, max(1, int(round(fraction * num_clients))))


def fixed_batches(client_size: int, batch_size: int, steps: int, seed: int, round_idx: int,
                  client: int) -> np.ndarray:
    """[steps, batch_size] positions: epoch-wise shuffles (sampling without replacement within an
    epoch, a new permutation when one is used up). A client smaller than the batch repeats samples."""
    rng = numpy_rng(seed, "batches", round_idx, client)
    need = steps * batch_size
    perms = [rng.permutation(client_size) for _ in range(-(-need // client_size))]
    return np.concatenate(perms)[:need].reshape(steps, batch_size)


def poisson_batches(client_size: int, sample_rate: float, max_batch: int, steps: int, seed: int,
                    round_idx: int, client: int):
    """Poisson sampling for DP-SGD: each sample joins a step's batch with probability q, independently.

    Returns (positions [steps, max_batch], mask [steps, max_batch] bool). Batches are padded to the fixed
    max_batch (static shapes); padded slots have mask False and contribute exactly zero. A draw larger
    than max_batch is an error rather than a silent truncation, which would break the privacy analysis.
    """
    rng = numpy_rng(seed, "poisson", round_idx, client)
    positions = np.zeros((steps, max_batch), dtype=np.int64)
    mask = np.zeros((steps, max_batch), dtype=bool)
    for s in range(steps):
        chosen = np.flatnonzero(rng.random(client_size) < sample_rate)
        if len(chosen) > max_batch:
            raise PoissonOverflowError(
                f"a Poisson batch of {len(chosen)} samples exceeds the padded size max_batch={max_batch} "
                f"(q={sample_rate:.4g}, client {client} of size {client_size}, round {round_idx + 1}); raise "
                f"dp.max_batch_factor (it changes only the padding, so the run resumes from its last round)")
        positions[s, : len(chosen)] = chosen
        mask[s, : len(chosen)] = True
    return positions, mask
