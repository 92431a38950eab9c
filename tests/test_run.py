"""One experiment end to end: files written, provenance saved, a SIGKILLed run resumes to the same numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.run import run

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
    cfg = dict(SMOKE, **{"dp.epsilon": 3.0})
    proc = subprocess.run([sys.executable, "-c", KILLER % cfg, str(tmp_path / "killed")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint.pt").exists()
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert len(_metrics(tmp_path / "killed")) == 2 * 2
    resumed = run(load_config(overrides=cfg), tmp_path / "killed", progress=False)
    straight = run(load_config(overrides=cfg), tmp_path / "straight", progress=False)
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
    """Through the whole pipeline (config -> partitions -> DP calibration -> engine): seed 1 at epsilon 8,
    run inside seeds [0, 1] x sweep dp.epsilon [3, 8], equals seed 1 at epsilon 8 run alone. Chunks of one
    federation's replicas (m = 2) keep every GEMM shape, so equality is exact."""
    import torch
    base = dict(SMOKE, replica_chunk=2, rounds=2)
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
