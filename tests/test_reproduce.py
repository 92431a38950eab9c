"""make reproduce end to end on the smoke profile: runs, a failing run recorded and skipped over, tables,
figures and README written, figures rebuilt byte for byte; a run's adapter exported to peft gives the
engine's logits."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from scripts import figures, reproduce
from scripts.figures.load import variant_str

FAILING = "sst2-ffa_lora-dp"


def _outputs(root):
    """Every file the figures step writes: {relative path: bytes}."""
    root = Path(root)
    files = [root / "README.md"]
    for sub in ("tables", "figures"):
        files += sorted(root.glob(f"*/smoke/{sub}/*"))
    files += sorted((root / "partitions" / "smoke").glob("*"))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    import fedsim.run
    root = tmp_path_factory.mktemp("results")
    real = fedsim.run.run

    def flaky(cfg, out_dir, progress=True):
        if Path(out_dir).name == FAILING:
            raise RuntimeError("boom (injected by the test)")
        return real(cfg, out_dir, progress=False)

    mp = pytest.MonkeyPatch()
    mp.setattr(fedsim.run, "run", flaky)
    try:
        assert reproduce.main(["--profile", "smoke", "--results", str(root), "--only", "ffa_table",
                               "communication"]) == 0
    finally:
        mp.undo()
    return root


def test_smoke_reproduce_writes_runs_tables_figures_readme(smoke_results):
    root = smoke_results
    failed = json.loads((root / "ffa_table" / "smoke" / FAILING / "summary.json").read_text())
    assert failed["status"].startswith("failed: RuntimeError: boom") and "Traceback" in failed["error"]
    finished = [p for p in root.glob("*/smoke/*/summary.json") if p.parent.name != FAILING]
    assert len(finished) == 3 + 3              # the other ffa_table runs + heterogeneity at iid, 3 methods
    for p in finished:
        s = json.loads(p.read_text())
        assert s["status"] == "finished", (p, s["status"])
        for f in ("config.yaml", "metrics.jsonl", "env.json", "run.json", "partitions.csv"):
            assert (p.parent / f).exists(), (p.parent, f)
    for ext in ("md", "csv", "tex"):
        assert (root / "ffa_table" / "smoke" / "tables" / f"accuracy.{ext}").exists()
        assert (root / "communication" / "smoke" / "tables" / f"bytes_to_target.{ext}").exists()
    for ext in ("png", "pdf"):
        assert (root / "ffa_table" / "smoke" / "figures" / f"accuracy_vs_privacy.{ext}").exists()
        assert (root / "communication" / "smoke" / "figures" / f"accuracy_vs_upload_sst2_iid.{ext}").exists()
    assert list((root / "partitions" / "smoke").glob("*.png"))
    readme = (root / "README.md").read_text()
    for text in ("## ffa_table", "## communication", "Seed-paper claims", "SA-FedLoRA", "FFA-LoRA",
                 "SMOKE PROFILE", f"run `{FAILING}`: failed", "How this differs from the papers"):
        assert text in readme, text
    assert "ε=6" in (root / "ffa_table" / "smoke" / "tables" / "accuracy.md").read_text()
    # heterogeneity's smoke runs score a 20-row curve subset before the last round, and both at it
    rows = [json.loads(line) for line in (root / "heterogeneity" / "smoke" / "sst2-iid-fedavg_lora" /
                                          "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows if "acc_validation" in r} == {2}
    assert all("acc_validation_curve" in r for r in rows)


def test_tuning_pass_chooses_on_dev_and_the_run_uses_the_choice(smoke_results):
    """The non-private smoke runs are tuned: one pass over the lr grid (tuning seed 100, 20% of the training
    rows held out as "dev"), the best mean dev accuracy chosen, the run made with it on all its rows."""
    import yaml
    for method in ("fedavg_lora", "ffa_lora"):
        name = f"sst2-{method}-nonprivate"
        tuning = smoke_results / "ffa_table" / "smoke-tuning" / name
        record = json.loads((tuning / "tuning.json").read_text())
        assert [row["optimizer.lr"] for row in record["table"]] == [0.005, 0.02]
        best = max(record["table"], key=lambda row: row["dev_accuracy"])
        assert record["chosen"] == {"optimizer.lr": best["optimizer.lr"]}
        tcfg = yaml.safe_load((tuning / "config.yaml").read_text())
        assert tcfg["seeds"] == [100] and tcfg["dev_fraction"] == 0.2
        assert tcfg["sweep"] == {"optimizer.lr": [0.005, 0.02]}
        summary = json.loads((tuning / "summary.json").read_text())
        assert all(set(f["final"]) == {"dev"} for f in summary["federations"])     # the reported split unseen
        run = smoke_results / "ffa_table" / "smoke" / name
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["optimizer"]["lr"] == record["chosen"]["optimizer.lr"] and cfg["dev_fraction"] == 0
        assert cfg["seeds"] == [0, 1] and not cfg["sweep"]
        assert json.loads((run / "run.json").read_text())["tuned"]["chosen"] == record["chosen"]


def test_compare_sets_each_regenerated_cell_beside_the_committed_one(smoke_results, tmp_path):
    import shutil
    from scripts import compare
    rerun = tmp_path / "rerun"
    shutil.copytree(smoke_results, rerun)
    run = rerun / "ffa_table" / "smoke" / "sst2-fedavg_lora-dp"
    s = json.loads((run / "summary.json").read_text())
    s["federations"][0]["final"]["validation"] += 0.5           # one cell far outside any seed noise
    (run / "summary.json").write_text(json.dumps(s))
    table = compare.compare(smoke_results, rerun, "smoke")
    changed = table[(table.run == "sst2-fedavg_lora-dp") & (table.seed == s["federations"][0]["seed"])
                    & (table.variant == variant_str(s["federations"][0]["variant"]))]
    assert list(changed["outcome"]) == ["differs"]
    assert (table["outcome"] == "identical").sum() == len(table) - 1 and len(table) > 10
    counts = compare.write(table, rerun / "COMPARISON.md", "smoke")
    assert counts == {"identical": len(table) - 1, "differs": 1}
    assert "| differs |" in (rerun / "COMPARISON.md").read_text()


def test_choose_takes_the_best_mean_dev_accuracy_and_never_a_failed_point():
    fed = lambda lr, eps, acc, status="finished": dict(variant={"optimizer.lr": lr, "dp.epsilon": eps},  # noqa
                                                      status=status, final=None if acc is None else {"dev": acc})
    summary = {"federations": [fed(0.1, 1, 0.5), fed(0.1, 6, 0.75), fed(0.3, 1, 0.875), fed(0.3, 6, 0.9, "failed"),
                               fed(0.03, 1, 0.5), fed(0.03, 6, 0.6875), fed(0.01, 1, 0.625), fed(0.01, 6, 0.625)]}
    chosen, table = reproduce.choose(summary, {"optimizer.lr": [0.03, 0.1, 0.3]})
    assert chosen == {"optimizer.lr": 0.1}                  # 0.3 had a failed federation: no score
    assert [row["dev_accuracy"] for row in table] == [0.59375, 0.625, None] and table[2]["failed"] == 1
    # equal scores: the first grid point
    assert reproduce.choose(summary, {"optimizer.lr": [0.01, 0.1]})[0] == {"optimizer.lr": 0.01}
    assert reproduce.choose(summary, {"optimizer.lr": [0.1, 0.01]})[0] == {"optimizer.lr": 0.1}
    with pytest.raises(RuntimeError, match="every grid point"):
        reproduce.choose(summary, {"optimizer.lr": [0.3]})


def test_figures_rebuild_identically_and_finished_runs_are_skipped(smoke_results, monkeypatch):
    root = smoke_results
    before = _outputs(root)
    assert len(before) > 10
    figures.main(["--results", str(root)])          # the only profile present: smoke
    assert _outputs(root) == before
    import fedsim.run

    def never(*a, **k):
        raise AssertionError("a finished or recorded-failed run was run again")
    monkeypatch.setattr(fedsim.run, "run", never)
    reproduce.main(["--profile", "smoke", "--results", str(root), "--only", "ffa_table", "--no-figures"])
    s = json.loads((root / "ffa_table" / "smoke" / FAILING / "summary.json").read_text())
    assert s["status"].startswith("failed")


@pytest.mark.parametrize("run_name,federation", [("sst2-iid-fedavg_lora", 1), ("sst2-iid-sa_fedlora", 0)])
def test_peft_export_matches_engine_logits(smoke_results, tmp_path, run_name, federation):
    import yaml
    from peft import PeftModel

    from fedsim.models import load_backbone
    from fedsim.stacked import StackedModel
    from scripts.export_peft import export_peft, load_final_global

    run_dir = smoke_results / "heterogeneity" / "smoke" / run_name
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    out = export_peft(run_dir, tmp_path / "adapter", federation=federation)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert any(k.startswith("base_model.model.classifier") and k.endswith("weight") for k in keys)
    assert json.loads((out / "fedsim_export.json").read_text())["pooling"] == "mean"   # MiniLM's own convention

    kw = dict(num_labels=2, num_hidden_layers=cfg["num_hidden_layers"])
    base, tok = load_backbone(cfg["model"], seed=123, **kw)          # a different head: peft must restore it
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    batch = tok(["a gripping, funny and moving film", "dull and far too long", "it is what it is"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        got = peft_model(**batch).logits

    state = load_final_global(run_dir)
    glob = state["global"]
    rank = next(v for k, v in glob.items() if k.endswith(".lora_A")).shape[1]
    model, _ = load_backbone(cfg["model"], seed=0, **kw)
    stacked = StackedModel(model, 1, rank, tuple(cfg["lora"]["targets"]))
    tensors = stacked.tensors()
    with torch.no_grad():
        for name, t in glob.items():
            tensors[name][0].copy_(t[federation])
        for name, layer in stacked.lora.items():
            layer.scale.fill_(float(state["lora_scale"][name][federation]))
    stacked.state.active = slice(0, 1)
    with torch.no_grad():
        want = stacked(**batch)
    assert got.shape == want.shape == (3, 2)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(want[0], want[1])       # a trained, input-dependent model, not a constant


def test_runs_with_the_same_tuning_pass_share_it(tmp_path):
    """Two runs whose tuning passes are one config (each partition of a method tuned on the IID split) train
    that pass once; both get its choice."""
    import yaml
    passes = []

    def runner(cfg, out, progress=False):
        passes.append(out)
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        feds = [dict(variant={"optimizer.lr": lr}, status="finished", final={"dev": acc})
                for lr, acc in zip(cfg["sweep"]["optimizer.lr"], (0.5, 0.75))]
        summary = dict(status="finished", federations=feds)
        (out / "summary.json").write_text(json.dumps(summary))
        return summary
    tune = {"grid": {"optimizer.lr": [0.01, 0.02]}, "seeds": [100], "dev_fraction": 0.2,
            "set": {"partition": {"name": "iid"}}}
    chosen = []
    for name, partition in [("iid", {"name": "iid"}), ("dir0.1", {"name": "dirichlet", "alpha": 0.1})]:
        spec = dict(name=name, overrides={"task": "sst2", "partition": partition}, tune=tune)
        over, record = reproduce.tune_one("fam", "quick", spec, tmp_path, runner)
        assert over["partition"] == partition                 # the run itself keeps its own split
        chosen.append((over["optimizer"]["lr"], record["tuning_dir"]))
    assert len(passes) == 1 and chosen == [(0.02, "fam/quick-tuning/iid")] * 2


def test_a_config_key_added_later_at_its_default_keeps_saved_runs_current(tmp_path):
    import yaml
    cfg = reproduce.build_config({"task": "sst2", "dp": {"epsilon": 3.0}})
    older = json.loads(json.dumps(cfg))
    del older["dp"]["head_share"]                       # written before dp.head_share existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert reproduce.saved_config(tmp_path / "config.yaml") == cfg
    older["dp"]["max_grad_norm"] = 2.0                  # a real difference still counts
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert reproduce.saved_config(tmp_path / "config.yaml") != cfg


# ----------------------------------------------------------------------------- tuning extension, tie rule

def _scripted_runner(acc, calls, sleep=0.0):
    """A fedsim.run.run stand-in: writes config.yaml and summary.json; each federation of a tuning pass scores
    acc[its lr] on dev (a regular run scores 0.5)."""
    import time

    import yaml

    def runner(cfg, out, progress=False):
        out = Path(out)
        calls.append(out)
        time.sleep(sleep)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        lrs = cfg["sweep"].get("optimizer.lr", [cfg["optimizer"]["lr"]])
        feds = [dict(variant={"optimizer.lr": lr} if cfg["sweep"] else {}, status="finished",
                     final={"dev": acc[lr] if cfg["dev_fraction"] else 0.5}) for lr in lrs]
        summary = dict(status="finished", wall_s=1.0, federations=feds)
        (out / "summary.json").write_text(json.dumps(summary))
        return summary
    return runner


def _tuned_spec(grid, **tune):
    return dict(name="run", overrides={"task": "sst2"},
                tune={"grid": {"optimizer.lr": grid}, "seeds": [100], "dev_fraction": 0.2, **tune})


def test_extension_adds_points_beyond_the_edge_until_the_best_is_interior_and_resumes(tmp_path):
    """Best at the max: 0.08 (= 0.04 * 0.04 / 0.02) is added, still best, so 0.16; 0.08 is then interior.
    Each point is a pass of its own beside the first; a second call trains nothing, a killed one resumes."""
    acc = {0.01: 0.5, 0.02: 0.6, 0.04: 0.7, 0.08: 0.8, 0.16: 0.75}
    calls = []
    runner = _scripted_runner(acc, calls)
    spec = _tuned_spec([0.01, 0.02, 0.04], extend=3)
    over, record = reproduce.tune_one("fam", "quick", spec, tmp_path, runner)
    tuning = tmp_path / "fam" / "quick-tuning"
    assert calls == [tuning / "run", tuning / "run-ext1", tuning / "run-ext2"]
    assert over["optimizer"]["lr"] == 0.08 and record["chosen"] == {"optimizer.lr": 0.08}
    assert record["grid"] == {"optimizer.lr": [0.01, 0.02, 0.04, 0.08, 0.16]}
    assert record["grid_configured"] == {"optimizer.lr": [0.01, 0.02, 0.04]}
    assert [row["optimizer.lr"] for row in record["table"]] == [0.01, 0.02, 0.04, 0.08, 0.16]
    assert [row["dev_accuracy"] for row in record["table"]] == [0.5, 0.6, 0.7, 0.8, 0.75]
    assert [(e["side"], e["value"], e["tuning_dir"]) for e in record["extensions"]] == [
        ("max", 0.08, "fam/quick-tuning/run-ext1"), ("max", 0.16, "fam/quick-tuning/run-ext2")]
    assert record["at_edge"] == [] and record["limit_reached"] is False and record["extend"] == 3
    assert json.loads((tuning / "run" / "tuning.json").read_text()) == record
    calls.clear()
    assert reproduce.tune_one("fam", "quick", spec, tmp_path, runner)[1] == record and calls == []
    (tuning / "run-ext2" / "summary.json").unlink()          # killed during the second extension
    assert reproduce.tune_one("fam", "quick", spec, tmp_path, runner)[1] == record
    assert calls == [tuning / "run-ext2"]


def test_extension_stops_at_the_limit_and_extend_0_keeps_the_grid(tmp_path):
    acc = {0.1: 0.5, 0.01: 0.6, 0.001: 0.7, 0.0001: 0.8}             # the smaller, the better: never interior
    calls = []
    _, record = reproduce.tune_one("fam", "quick", _tuned_spec([0.01, 0.1], extend=2), tmp_path,
                                   _scripted_runner(acc, calls))
    assert len(calls) == 3 and record["chosen"] == {"optimizer.lr": 0.0001}
    assert record["grid"] == {"optimizer.lr": [0.0001, 0.001, 0.01, 0.1]}
    assert [e["side"] for e in record["extensions"]] == ["min", "min"]
    assert record["at_edge"] == [{"key": "optimizer.lr", "side": "min"}] and record["limit_reached"] is True
    calls.clear()
    spec = dict(_tuned_spec([0.01, 0.1]), name="plain")
    _, record = reproduce.tune_one("fam", "quick", spec, tmp_path / "b", _scripted_runner(acc, calls))
    assert len(calls) == 1 and record["chosen"] == {"optimizer.lr": 0.01} and record["extensions"] == []
    assert record["grid"] == record["grid_configured"] and record["limit_reached"] is True


def test_the_point_beyond_an_edge():
    assert reproduce.beyond([0.002, 0.005, 0.01], "min") == 0.0008               # ratio 2.5, not 0.0008000000001
    assert reproduce.beyond([0.002, 0.005, 0.01], "max") == 0.02
    assert reproduce.beyond([0, 1, 2], "min") == -1 and reproduce.beyond([2, 0, 1], "max") == 3   # a 0: the step
    assert reproduce.beyond([8, 16], "max") == 32 and isinstance(reproduce.beyond([8, 16], "max"), int)
    grid = {"optimizer.lr": [0.1, 0.3], "lora.alpha": [8]}                     # one value: no edge
    assert reproduce.edges({"optimizer.lr": 0.1, "lora.alpha": 8}, grid) == [("optimizer.lr", "min")]


def test_tie_rule_takes_the_median_of_the_points_within_x_of_the_best(tmp_path):
    table = [{"optimizer.lr": lr, "dev_accuracy": a} for lr, a in [(1, 0.81), (2, 0.805), (3, None), (4, 0.806),
                                                                 (5, 0.70)]]
    assert reproduce.pick(table) == (0, [0])                          # no tie rule: the best
    assert reproduce.pick(table, 0.01) == (1, [0, 1, 3])              # tied: 1, 2, 4 (3 failed); median: lr 2
    assert reproduce.pick(table, 0.005) == (1, [0, 1, 3])             # 0.81 - 0.805: within, inclusive
    assert reproduce.pick(table, 0.004) == (0, [0, 3])                # even count: the lower middle one
    # the rule applied before the edge test: the median of the plateau is interior, nothing is added
    acc = {0.01: 0.70, 0.02: 0.79, 0.04: 0.80}
    calls = []
    _, record = reproduce.tune_one("fam", "quick", _tuned_spec(list(acc), extend=2, tie_within=0.02), tmp_path,
                                   _scripted_runner(acc, calls))
    assert len(calls) == 1 and record["chosen"] == {"optimizer.lr": 0.02} and record["extensions"] == []
    assert record["tie_rule"]["tie_within"] == 0.02 and "median" in record["tie_rule"]["rule"]
    assert record["tie_rule"]["tied"] == [{"optimizer.lr": 0.02}, {"optimizer.lr": 0.04}]
    summary = {"federations": [dict(variant={"optimizer.lr": lr}, status="finished", final={"dev": a})
                               for lr, a in acc.items()]}
    assert reproduce.choose(summary, {"optimizer.lr": list(acc)}, 0.02)[0] == {"optimizer.lr": 0.02}


def test_tune_keys_are_checked_with_a_line_naming_the_fix():
    for tune, msg in [({"extnd": 1}, r"unknown tune keys \['extnd'\]; valid: .*'extend', 'tie_within'"),
                      ({"extend": -1}, "tune.extend must be a whole number >= 0"),
                      ({"extend": 1.5}, "tune.extend must be a whole number >= 0"),
                      ({"tie_within": 1.5}, r"tune.tie_within must be an accuracy gap in \[0, 1\)"),
                      ({"extend": 1, "grid": {"optimizer.lr": [0.01]}}, "at least 2 values")]:
        spec = _tuned_spec([0.01, 0.02])
        spec["tune"].update(tune)
        with pytest.raises(ValueError, match=msg):
            reproduce.tuning_config(spec)
    assert reproduce.tune_protocol(_tuned_spec([0.01, 0.02], extend=2, tie_within=0.01)) == (2, 0.01)


# ----------------------------------------------------------------------------- --only, plan, timing

TOY = """family: toy
profiles:
  smoke:
    base: {task: sst2, num_hidden_layers: 2, train_subsample: 120, rounds: 2}
    axes:
      - {name: method, key: method, values: [fedavg_lora, ffa_lora]}
    when:
      - {match: {method: ffa_lora}, set: {tune: {grid: {optimizer.lr: [0.01, 0.02]}, seeds: [100],
                                                 dev_fraction: 0.2}}}
"""
OTHER = """family: other
profiles:
  quick:
    base: {task: sst2}
"""


@pytest.fixture
def toy_configs(tmp_path):
    d = tmp_path / "configs"
    d.mkdir()
    (d / "toy.yaml").write_text(TOY)
    (d / "other.yaml").write_text(OTHER)
    return d


@pytest.fixture
def no_runner(monkeypatch):
    import fedsim.run

    def never(*a, **k):
        raise AssertionError("a run started")
    monkeypatch.setattr(fedsim.run, "run", never)


@pytest.mark.parametrize("only,why", [("nope", "'nope' is not a family"),
                                      ("other", "'other' has no smoke profile")])
def test_only_an_unknown_family_or_one_without_the_profile_is_one_line(toy_configs, tmp_path, no_runner, capsys,
                                                                       only, why):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--profile", "smoke", "--configs", str(toy_configs), "--results", str(tmp_path / "r"),
                        "--only", "toy", only])
    msg = str(e.value.code)
    assert msg == f"reproduce: --only: {why}; families with a smoke profile: toy"
    assert capsys.readouterr().out == "" and not (tmp_path / "r").exists()


def _toy_config(name, **changes):
    """The resolved config of toy's smoke run `name`, with dotted-key changes (what its config.yaml holds)."""
    from scripts.families import build_config, expand
    spec = next(r for r in expand(yaml.safe_load(TOY), "smoke") if r["name"] == name)
    cfg = build_config(spec["overrides"])
    for key, value in changes.items():
        *path, last = key.split(".")
        node = cfg
        for k in path:
            node = node[k]
        node[last] = value
    return cfg


def _committed(root, runs, **changes):
    """Committed results with {run name: (wall_s, tuning passes' wall_s)} for family toy, profile smoke, each
    with the config.yaml of that run (dotted-key `changes` applied: a twin of another config)."""
    for name, (wall, passes) in runs.items():
        d = root / "toy" / "smoke" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"status": "finished", "wall_s": wall}))
        (d / "config.yaml").write_text(yaml.safe_dump(_toy_config(name, **changes)))
        meta = {"name": name}
        if passes:
            first = f"toy/smoke-tuning/{name}"
            meta["tuned"] = {"chosen": {}, "tuning_dir": first}
            dirs = [first] + [f"{first}-ext{i}" for i in range(1, len(passes))]
            for rel, w in zip(dirs, passes):
                (root / rel).mkdir(parents=True)
                (root / rel / "summary.json").write_text(json.dumps({"status": "finished", "wall_s": w}))
            record = {"extensions": [{"tuning_dir": x} for x in dirs[1:]]}
            (root / first / "tuning.json").write_text(json.dumps(record))
        (d / "run.json").write_text(json.dumps(meta))


def _plan_lines(toy_configs, tmp_path, committed, capsys):
    assert reproduce.main(["--profile", "smoke", "--configs", str(toy_configs), "--results", str(tmp_path / "r"),
                           "--compare", str(committed), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, x in enumerate(out) if x.startswith("plan")) + 1
    return [" ".join(line.split()) for line in out[start:start + 2]]


def test_plan_estimates_from_the_committed_twins(toy_configs, tmp_path, no_runner, capsys):
    both, one, none = tmp_path / "both", tmp_path / "one", tmp_path / "none"
    _committed(both, {"fedavg_lora": (120, None), "ffa_lora": (30, [60, 30])})   # a pass and one extension
    _committed(one, {"fedavg_lora": (120, None)})
    none.mkdir()
    assert _plan_lines(toy_configs, tmp_path, both, capsys) == [
        "toy 4 runs (2 + 2 tuning passes) est. 4.0 min", "total 4 runs (2 + 2 tuning passes) est. 4.0 min"]
    assert _plan_lines(toy_configs, tmp_path, one, capsys) == [
        "toy 3 runs (2 + 1 tuning passes) est. 2.0 min + 1 run with no estimate",
        "total 3 runs (2 + 1 tuning passes) est. 2.0 min + 1 run with no estimate"]
    assert _plan_lines(toy_configs, tmp_path, none, capsys) == [
        "toy 3 runs (2 + 1 tuning passes) no estimate", "total 3 runs (2 + 1 tuning passes) no estimate"]
    done = tmp_path / "r" / "toy" / "smoke" / "fedavg_lora"      # already finished in the results root: 0
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"status": "finished"}))
    assert _plan_lines(toy_configs, tmp_path, one, capsys)[0] == \
        "toy 3 runs (2 + 1 tuning passes) est. 0.0 min + 1 run with no estimate"


def test_plan_estimates_only_from_a_twin_of_the_same_config(toy_configs, tmp_path, no_runner, capsys):
    """A committed run of another config (here more rounds) says nothing about this one's time; a twin whose
    tuning chose another learning rate (the tuned key) still does."""
    other, tuned = tmp_path / "other", tmp_path / "tuned"
    _committed(other, {"fedavg_lora": (120, None), "ffa_lora": (30, [60])}, rounds=3)
    _committed(tuned, {"fedavg_lora": (120, None)})
    _committed(tuned, {"ffa_lora": (30, [60])}, **{"optimizer.lr": 0.02})     # tuned: ffa_lora's grid key
    assert _plan_lines(toy_configs, tmp_path, other, capsys)[0] == "toy 3 runs (2 + 1 tuning passes) no estimate"
    assert _plan_lines(toy_configs, tmp_path, tuned, capsys)[0] == "toy 3 runs (2 + 1 tuning passes) est. 3.5 min"


def test_eta_scales_the_remaining_estimates_by_measured_over_estimated():
    assert reproduce.eta([100, None, 50, 0], []) == (150, 1)
    assert reproduce.eta([100, None, 50, 0], [(200, "computed")]) == (100, 1)         # twice as slow here
    assert reproduce.eta([100, None, 50, 0], [(0.1, "skipped"), (9, "computed")]) == (50, 0)   # no basis yet


def test_timing_json_merges_across_a_resumed_sweep(toy_configs, tmp_path, monkeypatch, capsys):
    import fedsim.run
    monkeypatch.setattr(reproduce, "partition_csv", lambda cfg: "seed\n")
    calls = []
    runner = _scripted_runner({0.01: 0.6, 0.02: 0.7}, calls, sleep=0.05)

    def killed_at_ffa(cfg, out, progress=True):
        if "ffa_lora" in str(out):
            raise KeyboardInterrupt
        return runner(cfg, out, progress)
    root = tmp_path / "r"
    argv = ["--profile", "smoke", "--configs", str(toy_configs), "--results", str(root), "--no-figures"]
    monkeypatch.setattr(fedsim.run, "run", killed_at_ffa)
    assert reproduce.main(argv) == 130
    path = root / "toy" / "smoke" / "timing.json"
    first = json.loads(path.read_text())
    w1 = first["runs"]["fedavg_lora"]["wall_s"]
    assert w1 >= 0.05 and first["runs"]["fedavg_lora"]["this_invocation"] == "computed"
    assert set(first["runs"]) == {"fedavg_lora"} and first["wall_s"] == w1

    monkeypatch.setattr(fedsim.run, "run", runner)          # resumed: fedavg_lora skipped, ffa_lora computed
    assert reproduce.main(argv) == 0
    assert "[2/2] toy/ffa_lora: finished" in capsys.readouterr().out
    second = json.loads(path.read_text())
    runs = second["runs"]
    assert runs["fedavg_lora"]["wall_s"] == w1 and runs["fedavg_lora"]["this_invocation"] == "skipped"
    assert runs["fedavg_lora"]["computed_at"] == first["runs"]["fedavg_lora"]["computed_at"]
    assert runs["ffa_lora"]["this_invocation"] == "computed" and runs["ffa_lora"]["wall_s"] >= 0.1  # pass + run
    assert second["wall_s"] == pytest.approx(w1 + runs["ffa_lora"]["wall_s"], abs=0.011)
    assert second["invocation"]["computed"] == 1 and second["invocation"]["reused"] == 1
    assert second["invocation"]["wall_s"] < w1 + runs["ffa_lora"]["wall_s"] + 0.05
    assert second["runs_without_wall_s"] == []

    n = len(calls)
    assert reproduce.main(argv) == 0 and len(calls) == n    # all reused: nothing counted twice
    third = json.loads(path.read_text())
    assert third["wall_s"] == second["wall_s"]
    assert {r["this_invocation"] for r in third["runs"].values()} == {"skipped"}
    assert [third["runs"][k]["wall_s"] for k in runs] == [runs[k]["wall_s"] for k in runs]


def test_exclude_rules_take_a_label_or_a_list_of_labels_like_when_rules():
    from scripts.families import expand
    doc = yaml.safe_load("""family: grid
profiles:
  smoke:
    base: {task: sst2}
    axes:
      - {name: task, key: task, values: [sst2, mnli]}
      - {name: privacy, values: [{label: nonprivate, set: {}}, {label: clip_only, set: {}}, {label: dp, set: {}}]}
    exclude:
      - {task: mnli, privacy: [clip_only, dp]}
      - {task: sst2, privacy: clip_only}
""")
    names = [r["name"] for r in expand(doc, "smoke")]
    assert names == ["sst2-nonprivate", "sst2-dp", "mnli-nonprivate"]


def test_a_personal_score_tunes_on_each_clients_own_model_not_the_global_one(tmp_path):
    """FedSA-LoRA's global model keeps B at zero: scored on dev it would pick the lr best for the head alone.
    With tune.score personal the pass is scored on the personalized accuracy, here the opposite ordering."""
    import yaml
    dev = {0.01: 0.7, 0.02: 0.6, 0.04: 0.5}
    personal = {0.01: 0.5, 0.02: 0.6, 0.04: 0.55}

    def runner(cfg, out, progress=False):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert cfg["personal_eval_fraction"] == 0.1 and cfg["dev_fraction"] == 0.2
        feds = [dict(variant={"optimizer.lr": lr}, status="finished", final={"dev": dev[lr], "personal": personal[lr]})
                for lr in cfg["sweep"]["optimizer.lr"]]
        summary = dict(status="finished", wall_s=1.0, federations=feds)
        (out / "summary.json").write_text(json.dumps(summary))
        return summary
    spec = _tuned_spec(list(dev), score="personal")
    spec["overrides"]["personal_eval_fraction"] = 0.1
    over, record = reproduce.tune_one("fam", "quick", spec, tmp_path, runner)
    assert record["chosen"] == {"optimizer.lr": 0.02} and over["optimizer"]["lr"] == 0.02
    assert record["score"] == "personal" and record["split"].startswith("personal")
    assert [row["dev_accuracy"] for row in record["table"]] == [0.5, 0.6, 0.55]
    assert "best mean personal accuracy" in record["tie_rule"]["rule"]
    spec = _tuned_spec(list(dev))                       # the default scores the global model on dev
    spec["overrides"]["personal_eval_fraction"] = 0.1
    assert reproduce.tune_one("fam", "quick", spec, tmp_path / "dev", runner)[1]["chosen"] == {"optimizer.lr": 0.01}


@pytest.mark.parametrize("tune,overrides,msg", [
    ({"score": "global"}, {}, r"tune.score must be one of \['dev', 'personal'\] \(got 'global'\)"),
    ({"score": "personal"}, {}, "tune.score personal needs held-out client rows; set personal_eval_fraction")])
def test_a_bad_tuning_score_is_one_line_naming_the_fix(tune, overrides, msg):
    spec = _tuned_spec([0.01, 0.02], **tune)
    spec["overrides"].update(overrides)
    with pytest.raises(ValueError, match=msg):
        reproduce.tuning_config(spec)


def test_every_committed_run_and_tuning_config_is_valid_before_any_compute():
    """Each run of every family and profile in configs/ (and its tuning pass) resolves to a valid config, its tune
    block passes the checks, and the run names of a profile are unique: a typo in a YAML file fails here, not
    hours into `make reproduce`."""
    from scripts.families import build_config, expand, load_families
    for fam, doc in load_families().items():
        for profile in doc.get("profiles", {}):
            specs = expand(doc, profile)
            names = [s["name"] for s in specs]
            assert len(names) == len(set(names)), (fam, profile)
            for spec in specs:
                build_config(spec["overrides"])
                if spec.get("tune"):
                    reproduce.tuning_config(spec)


def test_a_readme_over_two_profiles_shows_each_family_and_claim_from_the_profile_that_ran_it(smoke_results,
                                                                                            tmp_path):
    """With standard and quick runs saved, results/README.md takes each family's section from standard where
    it has runs and from quick otherwise (pointing to the other's tables), and each claim row names its profile."""
    import shutil
    root = tmp_path / "r"
    shutil.copytree(smoke_results / "ffa_table" / "smoke", root / "ffa_table" / "standard")
    shutil.copytree(smoke_results / "ffa_table" / "smoke", root / "ffa_table" / "quick")
    shutil.copytree(smoke_results / "heterogeneity" / "smoke", root / "heterogeneity" / "quick")
    assert figures.main(["--results", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert "## ffa_table (standard profile)" in text and "## heterogeneity (quick profile)" in text
    assert "the quick profile's tables and figures: `ffa_table/quick/`" in text
    assert (root / "ffa_table" / "quick" / "tables").is_dir() and (root / "ffa_table" / "standard" / "tables").is_dir()
    head = next(line for line in text.splitlines() if line.startswith("| id |"))
    assert "| ours | profile | verdict |" in head
    sst2_a = [line for line in text.splitlines() if line.startswith("| a |") and ": sst2" in line]
    assert sst2_a and all("| standard | **" in line and "**not run**" not in line for line in sst2_a)


def test_merge_claims_takes_each_claim_from_the_first_profile_that_ran_it():
    from scripts.figures.claims import ClaimRow, merge_claims

    def row(cid, claim, verdict):
        return ClaimRow(cid, "P", claim, "-", "ours", verdict, "-", "fam")
    standard = [row("a", "x: mnli", "not run"), row("a", "x: sst2", "reproduced"), row("fedsa_lora", "m", "not run")]
    quick = [row("a", "x: mnli", "refuted"), row("a", "x: sst2", "refuted"), row("b", "y", "not run"),
             row("fedsa_lora", "m", "underpowered")]
    merged = merge_claims({"standard": standard, "quick": quick}, ["standard", "quick"])
    assert [(r.id, r.claim, r.verdict, r.profile) for r in merged] == [
        ("a", "x: mnli", "refuted", "quick"), ("a", "x: sst2", "reproduced", "standard"),
        ("b", "y", "not run", "quick"), ("fedsa_lora", "m", "underpowered", "quick")]
