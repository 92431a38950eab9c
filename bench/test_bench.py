"""pytest-benchmark cases: one training round of R clients on real SST-2 rows, three ways, side by side.

    .venv/bin/python -m pytest bench/ --benchmark-only --benchmark-json=results/bench/pytest_benchmark.json

(`make bench` runs this; CI does not: tests/ is the test suite.) The same work as
bench/engine_throughput.py at one size: the engine on packed tokens, the engine padded (length groups),
and the sequential peft loop with per-batch dynamic padding. pytest-benchmark's table gives each case's
time and their ratios; the JSON lands beside results/bench/engine_throughput.json.
"""
import numpy as np
import pytest
import torch

from bench.engine_throughput import build, model_factory, task_rows
from fedsim.reference import ReferenceConfig, run_reference

CLIENTS, BATCH, STEPS, LAYERS, RANK = 16, 8, 2, 6, 8


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, tok = model_factory(LAYERS, device)
    n = 4 * BATCH
    data = task_rows("sst2", CLIENTS * n, tok, 64)
    make_model, _ = model_factory(LAYERS, device)
    parts = [np.arange(i * n, (i + 1) * n) for i in range(CLIENTS)]
    return make_model, data, parts, device


def _engine_round(benchmark, setup, packed):
    make_model, data, parts, device = setup
    eng = build(make_model, data, parts, CLIENTS, STEPS, BATCH, RANK, device, packed, None)
    eng.run_round()                                              # warm-up
    benchmark.pedantic(eng.run_round, rounds=3, iterations=1)


def test_engine_round_packed_tokens(benchmark, setup):
    _engine_round(benchmark, setup, True)


def test_engine_round_padded(benchmark, setup):
    _engine_round(benchmark, setup, False)


def test_sequential_peft_round(benchmark, setup):
    make_model, data, parts, _ = setup
    cfg = ReferenceConfig(rounds=1, local_steps=STEPS, batch_size=BATCH, lr=1e-3, optimizer="adamw", lora_r=RANK,
                          lora_alpha=2 * RANK)
    run_reference(make_model, data, parts[:1], {}, cfg)          # warm-up
    benchmark.pedantic(run_reference, args=(make_model, data, parts, {}, cfg), rounds=3, iterations=1)
