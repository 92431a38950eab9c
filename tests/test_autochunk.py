"""The replica-chunk chooser: a divisor of the clients per round, measured once per shape, harmless."""
from types import SimpleNamespace

import torch

from fedsim.autochunk import choose_replica_chunk
from partitions import iid
from tests.helpers import make_engine

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}


def _engine(make_model, sst2_small, chunk=None):
    parts = iid(sst2_small["labels"].numpy(), 4, seed=0)
    return make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer=SGD, targets=["query", "value"],
                        fraction=1.0, K=2, chunk=chunk)


def test_choice_is_cached_and_leaves_the_run_unchanged(make_model, sst2_small, tmp_path, monkeypatch):
    cache = tmp_path / "chunk.json"
    eng = _engine(make_model, sst2_small)
    chosen = choose_replica_chunk(eng, 32, cache=cache)
    assert chosen in (1, 2, 4) and eng.chunk == chosen and cache.exists()
    eng.run_round()
    plain = _engine(make_model, sst2_small, chunk=chosen)          # same chunk, never measured
    plain.run_round()
    for n, v in plain.global_state.items():
        assert torch.equal(eng.global_state[n], v), n              # measuring steps left no trace
    again = _engine(make_model, sst2_small)
    monkeypatch.setattr(type(again), "local_step", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    assert choose_replica_chunk(again, 32, cache=cache) == chosen  # read from the cache, nothing timed


def test_larger_chunks_are_skipped_once_the_rate_drops(make_model, sst2_small, tmp_path, monkeypatch):
    """Steps whose time grows as c^2 (rate ~ 1/c): after c = 2 runs at half the best rate, c = 4 is never timed.
    The clock autochunk reads is a fake one that only these steps advance: the real step time, which another
    process on the machine can stretch, must not decide the test."""
    import fedsim.autochunk as autochunk
    eng = _engine(make_model, sst2_small)
    step, sizes, clock = type(eng).local_step, [], [0.0]

    def slow(self, plan, s, rs, opt):
        sizes.append(rs.stop - rs.start)
        clock[0] += 0.05 * (rs.stop - rs.start) ** 2
        return step(self, plan, s, rs, opt)
    monkeypatch.setattr(type(eng), "local_step", slow)
    monkeypatch.setattr(autochunk, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert choose_replica_chunk(eng, 32, cache=tmp_path / "chunk.json") == 1
    assert sizes == [1, 1, 2]                                        # warm-up, c = 1, c = 2; never c = 4
