"""Pick how many replicas share one forward/backward on a CPU (measured once per shape, cached on disk).

On a GPU all replicas in one pass is fastest until memory runs out. On a 2-core CPU a huge batch falls
out of cache and runs slower than several smaller ones, so the engine measures a few chunk sizes on
the real model and keeps the fastest. The result is cached in .cache/replica_chunk.json keyed by the
device, model shape, batch shape, DP mode, packed tokens and precision.

Candidates are the divisors of the clients per round m, so a chunk never holds replicas of two
federations, and the key depends on m, not on how many federations share the pass: a federation's
chunks then have exactly the shapes and contents they have when it runs alone, and the pass equals
the solo run bit for bit (GEMMs of other shapes round differently, which AdamW can amplify to 1e-2).
"""
import json
import os
import time
from pathlib import Path

import torch

from fedsim.files import atomic_write_text
from fedsim.optim import make_optimizer

CACHE = Path(os.environ.get("FEDSIM_CACHE") or Path(__file__).resolve().parent.parent / ".cache") / "replica_chunk.json"


def _key(engine, seq_len):
    cfg = engine.stacked.model.config
    dev = torch.cuda.get_device_name() if engine.device.type == "cuda" else f"cpu{torch.get_num_threads()}"
    # clients per round and the expected batch, not R or the padded Poisson size (they depend on the other
    # federations)
    return "|".join(map(str, (dev, cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, engine.clients_per_round,
                              engine.batch_size, seq_len, sorted(engine.tensors)[:1], len(engine.tensors),
                              engine.dp is not None, getattr(engine.stacked, "runs_packed_tokens", False),
                              engine.precision)))


def candidates(clients_per_round):
    """Chunk sizes tried: the divisors of the clients per round (chunks never straddle two federations)."""
    return [c for c in range(1, clients_per_round + 1) if clients_per_round % c == 0]


# Candidates are timed smallest first; once one runs below this share of the best rate so far, the larger
# ones (slower still: their batches fall further out of cache) are skipped.
STOP_BELOW = 0.8


def choose_replica_chunk(engine, seq_len, repeats=1, cache=CACHE):
    """Set engine.chunk to the fastest chunk size (real samples/s) measured on round-0 batches; returns it.

    Timing runs real local steps with a throwaway optimizer; the next round's broadcast overwrites
    whatever they changed, so results are unaffected. Cost: one warm-up step, then `repeats` steps of c
    replicas per candidate c until the rate falls below STOP_BELOW x the best, at most about half a
    round's work when K >= 2 (sum of the divisors of m over m K replica-steps; MNLI, 32 clients,
    K = 4: 24 s -> 10 s against a 14 s round) -- and only once per shape: the choice is cached."""
    key = _key(engine, seq_len)
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key in table:
        engine.chunk = table[key]["chunk"]
        return engine.chunk
    plan = engine.plan_round(0)
    engine.begin_round(plan)
    rates, failed = {}, dict(engine.failed)     # timing steps may blow up a huge-lr federation: not a result
    for i, c in enumerate(candidates(engine.clients_per_round)):
        opt = make_optimizer(engine.opt_cfg, engine.lr)
        rs = slice(0, c)
        if i == 0:                                       # allocator and kernels, once
            engine.local_step(plan, 0, rs, opt)
        t0 = time.perf_counter()
        for _ in range(repeats):
            engine.local_step(plan, 0, rs, opt)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        # real samples, not replicas: Poisson batches differ in size from replica to replica
        rates[c] = int(plan.masks[rs, 0].sum()) * repeats / (time.perf_counter() - t0)
        if rates[c] < STOP_BELOW * max(rates.values()):
            break
    engine.failed = failed
    best = max(rates, key=rates.get)
    table[key] = {"chunk": best, "samples_per_s": {str(k): round(v, 2) for k, v in rates.items()}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(table, indent=1))
    engine.chunk = best
    return best
