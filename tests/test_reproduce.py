"""make reproduce end to end on the smoke profile: runs, a failing run recorded and skipped over, tables,
figures and README written, figures rebuilt byte for byte; a run's adapter exported to peft gives the
engine's logits."""
import json
from pathlib import Path

import pytest
import torch

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
