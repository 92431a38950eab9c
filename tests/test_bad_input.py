"""Bad input through the CLI: one line naming the fix, exit status 2, no traceback, no compute, and an
existing run directory left byte for byte as it was. Also: resume under another config is refused, a
damaged checkpoint says what to do."""
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from fedsim import run as fedsim_run
from fedsim.engine import FederatedEngine

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
# The existing run every case is pointed at: private, 3 rounds, interrupted after round 1 (config.yaml,
# metrics.jsonl and checkpoint.pt on disk: the state a resume depends on).
BASE_SET = ["rounds=3", "replica_chunk=2", "dp.epsilon=8", "train_subsample=200"]


def snapshot(directory):
    """{relative path: sha256} of every file below directory."""
    d = Path(directory)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("existing") / "run"
    original = FederatedEngine.run_round

    def stop_in_round_2(self):
        if self.round_idx == 1:
            raise KeyboardInterrupt
        return original(self)
    FederatedEngine.run_round = stop_in_round_2
    try:
        assert fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "--out", str(out)]) == 130
    finally:
        FederatedEngine.run_round = original
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt"} <= set(snapshot(out))
    return out


@pytest.fixture
def no_compute(monkeypatch):
    """Any training step or chunk timing during a bad-input case is a failure of the test."""
    def refuse(*a, **k):
        raise AssertionError("compute started before the bad input was reported")
    monkeypatch.setattr(FederatedEngine, "run_round", refuse)
    monkeypatch.setattr(FederatedEngine, "local_step", refuse)


def corrupt_data_dir(tmp):
    d = tmp / "data" / "sst2"
    d.mkdir(parents=True)
    (d / "train.parquet").write_bytes(b"PAR1 not a parquet file at all")
    return d.parent


def broken_yaml(tmp):
    p = tmp / "broken.yaml"
    p.write_text("rounds: [1, 2\nseeds: 0\n")
    return p


# (id, extra argv for --set or a callable(tmp) -> full argv prefix, text the one-line message must contain)
CASES = [
    ("delta-word", ["dp.delta=abc"], "dp.delta must be a finite number"),
    ("rounds-fraction", ["rounds=2.5"], "rounds must be an integer"),
    ("clients-word", ["num_clients=many"], "num_clients must be an integer"),
    ("lr-infinite", ["optimizer.lr=.inf"], "optimizer.lr must be a finite number"),
    ("sweep-negative-lr", ["sweep={optimizer.lr: [-1.0, 0.1]}"], "optimizer.lr must be > 0"),
    ("sweep-zero-alpha", ["sweep={lora.alpha: [0, 16]}"], "lora.alpha must be > 0"),
    ("sweep-bad-epsilon", ["sweep={dp.epsilon: [3, -1]}"], "dp.epsilon must be > 0"),
    ("sweep-mixes-private", ["sweep={dp.epsilon: [3, null]}"], "run them as two runs"),
    ("sweep-shape-key", ["sweep={lora.rank: [4, 8]}"], "sweepable keys"),
    ("sweep-not-list", ["sweep={optimizer.lr: 0.1}"], "must be a non-empty list"),
    ("sweep-repeats", ["sweep={optimizer.lr: [0.1, 0.1]}"], "repeats a value"),
    ("eval-split-unknown", ["task=mnli", "eval_splits=[matched, test]"], "['test'] are not evaluation splits of mnli"),
    ("eval-split-not-list", ["eval_splits=validation"], "eval_splits must be a non-empty list of names"),
    ("sweep-clip-nonprivate", ["dp.epsilon=null", "sweep={dp.max_grad_norm: [0.5, 1.0]}"], "needs a private run"),
    ("sweep-clip-zero", ["sweep={dp.max_grad_norm: [0, 1.0]}"], "dp.max_grad_norm must be > 0"),
    ("head-share-1", ["dp.head_share=1.0"], "dp.head_share must be in (0, 1)"),
    ("dev-fraction-half", ["dev_fraction=0.5"], "dev_fraction must be in [0, 0.5)"),
    ("pooling-unknown", ["pooling=max"], "pooling must be auto, mean or cls"),
    ("seeds-repeat", ["seeds=[0,0]"], "each federation needs its own seed"),
    ("seeds-not-list", ["seeds=3"], "a non-empty list of integers"),
    ("unknown-optimizer", ["optimizer.name=adam"], "valid: ['sgd', 'adamw']"),
    ("betas-one", ["optimizer.betas=[0.9]"], "a list of two numbers"),
    ("momentum-one", ["optimizer.momentum=1.0"], "optimizer.momentum must be in [0, 1)"),
    ("max-batch-factor-0", ["dp.max_batch_factor=0"], "dp.max_batch_factor must be > 0"),
    ("epsilon-negative", ["dp.epsilon=-1"], "use epsilon: null for non-private"),
    ("epsilon-zero", ["dp.epsilon=0"], "dp.epsilon must be > 0 (got 0.0)"),
    ("epsilon-nan", ["dp.epsilon=nan"], "dp.epsilon must be a number > 0 or .inf (clipping without noise)"),
    ("epsilon-minus-inf", ["dp.epsilon=-.inf"], "dp.epsilon must be > 0 (got -inf)"),
    ("sweep-epsilon-nan", ["sweep={dp.epsilon: [.inf, .nan]}"], "sweep.dp.epsilon must be a number > 0 or .inf"),
    ("sweep-clip-only-mixes-non-private", ["sweep={dp.epsilon: [.inf, null]}"], "run them as two runs"),
    ("sweep-epsilon-inf-twice", ["sweep={dp.epsilon: [.inf, inf]}"], "repeats a value"),
    ("head-only-param", ["method={name: head_only, train_head: false}"], "unknown parameter(s) ['train_head']"),
    ("delta-above-1", ["dp.delta=1.5"], "dp.delta must be in (0, 1)"),
    ("unknown-accountant", ["dp.accountant=gdp"], "unknown dp.accountant"),
    ("epsilon-unreachable", ["dp.epsilon=0.0001"], "is unreachable"),
    ("unknown-method", ["method.name=qfedavg"], "unknown method 'qfedavg'"),
    ("fedprox-mu-negative", ["method={name: fedprox, mu: -0.1}"], "mu must be >= 0"),
    ("unknown-server-optimizer", ["server.optimizer=fedadamw"], "unknown server.optimizer 'fedadamw'"),
    ("server-lr-0", ["server.lr=0"], "server.lr must be > 0"),
    ("server-momentum-1", ["server.momentum=1"], "server.momentum must be in [0, 1)"),
    ("sweep-server-lr-negative", ["sweep={server.lr: [0.1, -1]}"], "server.lr must be > 0"),
    ("fedex-server-optimizer", ["method.name=fedex_lora", "server.optimizer=fedadam"], "use server.optimizer=fedavg"),
    ("flora-client-dp", ["method.name=flora", "dp.unit=client"], "client-level DP cannot protect method flora"),
    ("hetlora-rank-above-global", ["method={name: hetlora, rank_choices: [4, 16]}"], "must be integers in 1..8"),
    ("hetlora-prune-gamma-1", ["method={name: hetlora, prune_gamma: 1.5}"], "prune_gamma must be in (0, 1)"),
    ("hetlora-pruning-client-dp", ["method={name: hetlora, prune_gamma: 0.5}", "dp.unit=client"],
     "client-level DP cannot protect method hetlora"),
    ("flora-rank-above-global", ["method={name: flora, rank_choices: [2, 9]}"], "must be integers in 1..8"),
    ("dp-unit-unknown", ["dp.unit=user"], "dp.unit must be sample"),
    ("client-dp-every-client", ["dp.unit=client", "client_fraction=1"], "set client_fraction below 1"),
    ("client-dp-scaffold", ["dp.unit=client", "method.name=scaffold"], "client-level DP cannot protect method scaffold"),
    ("client-dp-head-share", ["dp.unit=client", "dp.head_share=0.2"], "applies to dp.unit=sample"),
    ("client-dp-quantile-1", ["dp.unit=client", "dp.target_quantile=1"], "dp.target_quantile must be in (0, 1)"),
    ("client-dp-count-noise-small", ["dp.unit=client", "dp.target_quantile=0.5"], "raise dp.clipped_count_stddev"),
    ("client-dp-clip-sweep", ["dp.unit=client", "sweep={dp.max_grad_norm: [0.5, 1.0]}"], "clips updates to dp.max_update_norm"),
    ("method-param-typo", ["method={name: slora, densty: 0.01}"], "unknown parameter(s) ['densty']"),
    ("method-param-type", ["method={name: slora, density: abc}"], "density must be float"),
    ("partition-param-typo", ["partition={name: dirichlet, alpah: 1}"], "takes no parameter(s) ['alpah']"),
    ("unknown-partition", ["partition={name: zipf}"], "unknown partition 'zipf'"),
    ("client-fraction-0", ["client_fraction=0"], "client_fraction must be in (0, 1]"),
    ("max-length-1", ["max_length=1"], "max_length must be >= 2"),
    ("unknown-task", ["task=squad"], "unknown task 'squad'"),
    ("strip-metadata-sst2", ["strip_metadata=true"], "strip_metadata applies to 20news only"),
    ("device-tpu", ["device=tpu"], "device must be auto, cpu, cuda"),
    ("replica-chunk-0", ["replica_chunk=0"], "replica_chunk must be >= 1"),
    ("section-as-value", ["lora=5"], "'lora' is a section"),
    ("unknown-key", ["optimizer.nesterov=true"], "unknown config key 'optimizer.nesterov'"),
    ("set-without-equals", ["rounds"], "--set expects key=value"),
    ("set-bad-yaml", ["seeds=[0,"], "not valid YAML"),
    ("too-many-clients", ["num_clients=400", "partition={name: iid}"], "lower num_clients"),
    ("too-many-layers", ["num_hidden_layers=99"], "num_hidden_layers must be an integer in 1..6"),
    ("targets-match-nothing", ["lora.targets=[qkv]"], "match no nn.Linear"),
    ("unknown-model", ["model=no-such-model-xyz"], "cannot load model"),
    ("data-dir-empty", lambda tmp: ["--set", f"data_dir={tmp}"], "looked in data_dir"),
    ("data-dir-corrupt", lambda tmp: ["--set", f"data_dir={corrupt_data_dir(tmp)}"], "cannot read"),
    ("config-missing", lambda tmp: ["--config", str(tmp / "nope.yaml")], "not found"),
    ("config-broken-yaml", lambda tmp: ["--config", str(broken_yaml(tmp))], "not valid YAML"),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-absent", ["device=cuda"], "sees no CUDA device"))


def _argv(case, tmp, out):
    _, extra, _ = case
    if callable(extra):
        extra = extra(tmp)
        if extra[0] == "--config":
            return [*extra, "--set", *BASE_SET, "--out", str(out)]
        return ["--config", SMOKE, "--set", *BASE_SET, *extra[1:], "--out", str(out)]
    return ["--config", SMOKE, "--set", *BASE_SET, *extra, "--out", str(out)]


def _one_clear_line(capsys, code, want):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert want in err, err
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_before_compute_run_dir_untouched(case, interrupted_run, tmp_path, capsys, no_compute):
    before = snapshot(interrupted_run)
    code = fedsim_run.main(_argv(case, tmp_path, interrupted_run))
    _one_clear_line(capsys, code, case[2])
    assert snapshot(interrupted_run) == before


def test_at_least_thirty_bad_inputs():
    assert len(CASES) >= 30


def test_out_that_is_a_file_or_a_foreign_directory(tmp_path, capsys, no_compute):
    f = tmp_path / "file"
    f.write_text("mine")
    code = fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "--out", str(f)])
    _one_clear_line(capsys, code, "is a file, not a directory")
    assert f.read_text() == "mine"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text("precious\n")
    code = fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "--out", str(foreign)])
    _one_clear_line(capsys, code, "no fedsim run (no config.yaml")
    assert snapshot(foreign) == {"metrics.jsonl": hashlib.sha256(b"precious\n").hexdigest()}


def test_resume_under_another_config_is_refused(interrupted_run, capsys, no_compute):
    """Killed at dp.epsilon=8, restarted at 0.5: refused, naming the key; the run directory is unchanged."""
    before = snapshot(interrupted_run)
    code = fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "dp.epsilon=0.5", "local_steps=3",
                            "--out", str(interrupted_run)])
    err = _one_clear_line(capsys, code, "another config")
    assert "dp.epsilon: 8.0 -> 0.5" in err and "local_steps: 2 -> 3" in err and "new --out" in err
    assert snapshot(interrupted_run) == before


def test_checkpoint_of_another_config_is_refused(interrupted_run, tmp_path, capsys, no_compute):
    """Even if config.yaml was edited by hand to match, the checkpoint's own config hash must match."""
    import yaml
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    cfg_text = (run_dir / "config.yaml").read_text().replace("epsilon: 8.0", "epsilon: 0.5")
    (run_dir / "config.yaml").write_text(cfg_text)
    assert yaml.safe_load(cfg_text)["dp"]["epsilon"] == 0.5
    before = snapshot(run_dir)
    code = fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "dp.epsilon=0.5", "--out", str(run_dir)])
    err = _one_clear_line(capsys, code, "checkpointed under another config")
    assert "dp.epsilon: 8.0 -> 0.5" in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_checkpoint_names_the_file_and_the_fix(interrupted_run, tmp_path, capsys, damage, no_compute):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    ckpt = run_dir / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    before = snapshot(run_dir)
    code = fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "--out", str(run_dir)])
    err = _one_clear_line(capsys, code, str(ckpt))
    assert "delete it to restart the run from round 0" in err
    assert snapshot(run_dir) == before


def test_result_neutral_keys_may_change_on_resume(interrupted_run, tmp_path, capsys):
    """device, replica_chunk, eval_batch_size and dp.max_batch_factor change no number: a resume may use
    other values, and ends exactly where the uninterrupted run ends."""
    import json
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    code = fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "replica_chunk=4", "eval_batch_size=7",
                            "dp.max_batch_factor=6", "device=cpu", "--out", str(run_dir)])
    assert code == 0, capsys.readouterr().err
    straight = tmp_path / "straight"
    assert fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "--out", str(straight)]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run_dir, straight))
    assert [f["final"] for f in a["federations"]] == [f["final"] for f in b["federations"]]
    assert [f["epsilon_spent"] for f in a["federations"]] == [f["epsilon_spent"] for f in b["federations"]]


def test_scientific_notation_and_types_parse():
    """YAML 1.1 reads 1e-6 as a string: config keys, sweep values and method parameters still get numbers."""
    from fedsim.config import load_config, parse_set
    cfg = load_config(SMOKE, parse_set(["dp.delta=1e-6", "optimizer.lr=1E-3", "rounds=1e1", "dp.epsilon=3",
                                        "sweep={lora.alpha: [8, 1.6e1]}", "method={name: slora, density: 2e-2}"]))
    assert cfg["dp"]["delta"] == 1e-6 and cfg["optimizer"]["lr"] == 1e-3 and cfg["rounds"] == 10
    assert isinstance(cfg["rounds"], int) and cfg["sweep"]["lora.alpha"] == [8.0, 16.0]
    assert cfg["method"]["density"] == 0.02 and cfg["dp"]["epsilon"] == 3.0


def test_epsilon_inf_is_clip_only_not_an_error():
    """dp.epsilon .inf / inf (YAML, --set) is the clip-only column: the DP schedule with sigma 0, a private
    value of its own that sweeps beside finite ones and, like them, refuses a non-private neighbour."""
    import math
    from fedsim.config import load_config, parse_set
    for value in (".inf", "inf", "Infinity"):
        assert load_config(SMOKE, parse_set([f"dp.epsilon={value}"]))["dp"]["epsilon"] == math.inf
    cfg = load_config(SMOKE, parse_set(["sweep={dp.epsilon: [.inf, 6, 3, 1]}"]))
    assert cfg["sweep"]["dp.epsilon"] == [math.inf, 6.0, 3.0, 1.0]
    cfg = load_config(SMOKE, parse_set(["dp.epsilon=inf", "sweep={dp.max_grad_norm: [0.5, 1.0]}"]))
    assert cfg["sweep"]["dp.max_grad_norm"] == [0.5, 1.0]      # a clip sweep is a private run's


def test_reproduce_checks_method_and_partition_parameters():
    from scripts.reproduce import build_config
    with pytest.raises(ValueError, match="densty"):
        build_config({"method": {"name": "slora", "densty": 0.01}})
    with pytest.raises(ValueError, match="alpah"):
        build_config({"partition": {"name": "dirichlet", "alpah": 0.5}})


def test_poisson_overflow_mid_run_is_one_line_and_resumes(tmp_path, capsys):
    """A Poisson batch larger than the padded size stops the run with the fix; the padding size changes no
    number, so the rerun with a larger dp.max_batch_factor resumes and ends like an uninterrupted run."""
    import json
    out = tmp_path / "run"
    base = ["--config", SMOKE, "--set", *BASE_SET, "rounds=4"]
    code = fedsim_run.main([*base, "dp.max_batch_factor=0.01", "--out", str(out)])
    _one_clear_line(capsys, code, "raise dp.max_batch_factor")
    assert fedsim_run.main([*base, "--out", str(out)]) == 0
    assert fedsim_run.main([*base, "--out", str(tmp_path / "straight")]) == 0
    a, b = (json.loads((d / "summary.json").read_text())["federations"] for d in (out, tmp_path / "straight"))
    assert [f["final"] for f in a] == [f["final"] for f in b]


def test_resume_under_new_code_is_recorded_in_env(interrupted_run, tmp_path):
    """Resuming after a new commit is normal (long runs span sessions), but provenance must say which code
    computed which rounds: env.json lists every version, oldest first."""
    import json
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["code"][0]["from_round"] == 1
    state["code"] = [dict(state["code"][0], git_commit="0" * 40)]                # as if written by older code
    torch.save(state, run_dir / "checkpoint.pt")
    assert fedsim_run.main(["--config", SMOKE, "--set", *BASE_SET, "--out", str(run_dir)]) == 0
    env = json.loads((run_dir / "env.json").read_text())
    assert [c["git_commit"] for c in env["code_by_round"]] == ["0" * 40, env["git_commit"]]
    assert env["code_by_round"][1]["from_round"] == 2
