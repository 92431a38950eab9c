"""The seed-paper claims table from synthetic typed results and tiny fake run directories (no training): rows
never omitted ("not run" with the command that runs them), FFA-LoRA's paired verdict per ε, the exact-half upload
check, SLoRA's gap-closed fraction, SA-FedLoRA's per-round upload check."""
import json

import pandas as pd
import pytest
import yaml

from scripts.figures.claims import claims, upload_nonincreasing
from scripts.figures.load import MB, agg
from scripts.figures.readme import CLAIM_COLUMNS, claims_section
from scripts.figures.results import FFATable, Heterogeneity

IDS = "abcdefghijk"


def _write_configs(d):
    """ffa_table: quick holds only SST-2 under DP (ε 3, 1), paper holds MNLI and SST-2, non-private and ε 6, 3, 1;
    alpha: only a paper section."""
    methods = {"name": "method", "key": "method", "values": ["fedavg_lora", "ffa_lora"]}

    def dp(*eps):
        return {"label": "dp", "set": {"sweep": {"dp.epsilon": list(eps)}}}
    ffa = {"family": "ffa_table", "profiles": {
        "paper": {"base": {"num_clients": 3, "rounds": 30},
                  "axes": [{"name": "task", "key": "task", "values": ["mnli", "sst2"]}, methods,
                           {"name": "privacy", "values": [{"label": "nonprivate", "set": {}}, dp(6, 3, 1)]}]},
        "quick": {"base": {"num_clients": 3, "rounds": 3},
                  "axes": [{"name": "task", "key": "task", "values": ["sst2"]}, methods,
                           {"name": "privacy", "values": [dp(3, 1)]}]}}}
    alpha = {"family": "alpha", "profiles": {"paper": {
        "base": {"task": "sst2"},
        "axes": [{"name": "method", "key": "method", "values": ["fedavg_lora", "ffa_lora"]},
                 {"name": "privacy", "values": [{"label": "nonprivate", "set": {}}]},
                 {"name": "lora_alpha", "key": "lora.alpha", "values": [1, 256]}]}}}
    d.mkdir(parents=True, exist_ok=True)
    (d / "ffa_table.yaml").write_text(yaml.safe_dump(ffa, allow_unicode=True))
    (d / "alpha.yaml").write_text(yaml.safe_dump(alpha, allow_unicode=True))
    return d


def _find(rows, cid, *words):
    got = [r for r in rows if r.id == cid and all(w in r.claim for w in words)]
    assert len(got) == 1, (cid, words, [r.claim for r in rows if r.id == cid])
    return got[0]


def test_missing_families_give_not_run_rows_with_the_command_that_runs_them(tmp_path):
    configs = _write_configs(tmp_path / "configs")
    rows = claims({}).rows("quick", root=tmp_path / "results", configs=configs)
    assert set(IDS) <= {r.id for r in rows}                             # every claim has a row, runs or not
    assert all(r.verdict == "not run" for r in rows)
    quick = "`python -m scripts.reproduce --profile quick --only ffa_table`"
    paper = "`python -m scripts.reproduce --profile paper --only ffa_table`"
    r = _find(rows, "b", "sst2", "ε=1")                                 # held by the rendered profile
    assert "not run in the quick profile" in r.ours and quick in r.ours and paper not in r.ours
    r = _find(rows, "b", "sst2", "ε=6")                                 # only the paper section sweeps ε=6
    assert paper in r.ours and quick not in r.ours
    assert "does not hold it" in r.ours
    assert paper in _find(rows, "a", "mnli").ours
    r = _find(rows, "f", "sst2", "non-private")                          # a family without a quick section
    assert "has no quick section" in r.ours and "--profile paper --only alpha" in r.ours
    r = _find(rows, "g")                                                 # no config of the family at all
    assert "no profile of configs/heterogeneity.yaml (absent) holds it" in r.ours
    assert [r.id for r in rows] == sorted(r.id for r in rows)            # (a) ... (k) in order
    md = claims_section(claims({}), "quick", tmp_path / "results")
    header = next(line for line in md if line.startswith("| id"))
    assert header == "| " + " | ".join(CLAIM_COLUMNS) + " |"


def _ffa(cells):
    """FFATable from {(method, privacy): [per-seed accuracy]} on SST-2."""
    rows = [dict(task="sst2", method=m, privacy=p, seed=s, acc=a, run=f"sst2-{m}-x")
            for (m, p), accs in cells.items() for s, a in enumerate(accs)]
    seeds = pd.DataFrame(rows)
    return {"ffa_table": FFATable(cells=agg(seeds, ["task", "method", "privacy"]), seeds=seeds)}


def test_ffa_verdict_per_epsilon_from_paired_seeds(tmp_path):
    res = _ffa({("ffa_lora", "non-private"): [0.85, 0.86, 0.87],
                ("fedavg_lora", "non-private"): [0.80, 0.81, 0.80],
                ("ffa_lora", "ε=6"): [0.80, 0.82, 0.81], ("fedavg_lora", "ε=6"): [0.70, 0.71, 0.69],  # +11 decided
                ("ffa_lora", "ε=3"): [0.70, 0.71, 0.69], ("fedavg_lora", "ε=3"): [0.80, 0.82, 0.81],  # reversed
                ("ffa_lora", "ε=1"): [0.80, 0.60, 0.75], ("fedavg_lora", "ε=1"): [0.70, 0.72, 0.69]})  # disagree
    rows = claims(res).rows("quick", root=None, configs=_write_configs(tmp_path))
    assert _find(rows, "a", "sst2").verdict == "reproduced"
    assert _find(rows, "b", "sst2", "ε=6").verdict == "reproduced"
    assert _find(rows, "b", "sst2", "ε=3").verdict == "refuted"
    r = _find(rows, "b", "sst2", "ε=1")
    assert r.verdict.startswith("underpowered (≈") and "seeds would decide" in r.verdict
    assert "paired seeds" in r.ours and "95% CI" in r.ours
    assert "[seed summary" in r.paper_number and "[review]" in r.paper_number
    assert _find(rows, "b", "mnli", "ε=1").verdict == "not run"


@pytest.mark.parametrize("ffa,fedavg,verdict", [
    ([0.80, 0.82, 0.81], [0.70, 0.71, 0.69], "reproduced"),
    ([0.70, 0.71, 0.69], [0.80, 0.82, 0.81], "refuted"),
    ([0.51, 0.52, 0.50], [0.50, 0.49, 0.51], "inconclusive (both at chance)"),     # SST-2 chance is 50%
])
def test_ffa_epsilon_1_verdict(tmp_path, ffa, fedavg, verdict):
    rows = claims(_ffa({("ffa_lora", "ε=1"): ffa, ("fedavg_lora", "ε=1"): fedavg})).rows(
        "quick", configs=_write_configs(tmp_path))
    assert _find(rows, "b", "sst2", "ε=1").verdict == verdict


def test_dp_lowers_accuracy_sequence_and_step_rule(tmp_path):
    res = _ffa({("fedavg_lora", "non-private"): [0.85, 0.86, 0.87], ("fedavg_lora", "ε=3"): [0.70, 0.71, 0.72],
                ("fedavg_lora", "ε=1"): [0.80, 0.81, 0.80],           # ε=1 rises 9 points above ε=3: not monotone
                ("ffa_lora", "non-private"): [0.85, 0.86, 0.87], ("ffa_lora", "ε=3"): [0.80, 0.81, 0.79],
                ("ffa_lora", "ε=1"): [0.75, 0.74, 0.76]})
    rows = claims(res).rows("quick", configs=_write_configs(tmp_path))
    assert _find(rows, "c", "sst2", "ffa_lora").verdict == "reproduced"
    r = _find(rows, "c", "sst2", "fedavg_lora")
    assert r.verdict.startswith("inconclusive (ε=3 → ε=1 rises")
    assert "ε=6 not run" in r.ours and "non-private 86.0" in r.ours


def _bytes_frame(ffa_bytes, fedavg_bytes, head_bytes):
    rows = []
    for m, b in (("ffa_lora", ffa_bytes), ("fedavg_lora", fedavg_bytes), ("head_only", head_bytes)):
        for s in range(2):
            for eps in ("ε=3", "ε=1"):
                rows.append(dict(task="sst2", method=m, privacy=eps, seed=s, variant=f"dp.epsilon={eps[2:]}",
                                 acc=0.8, run=f"sst2-{m}-dp", cum_up_MB=b / MB))
    seeds = pd.DataFrame(rows)
    return {"ffa_table": FFATable(cells=agg(seeds, ["task", "method", "privacy"]), seeds=seeds)}


@pytest.mark.parametrize("ffa_adapter,verdict,text", [(5000, "reproduced", "ratio 0.5 exactly over 4 federations"),
                                                      (5001, "refuted", "ratio 0.5001 (5,001/10,000)")])
def test_exact_half_of_the_adapter_bytes(tmp_path, ffa_adapter, verdict, text):
    head = 3080                                        # the head_only run's upload: the head alone
    res = _bytes_frame(head + ffa_adapter, head + 10000, head)
    r = _find(claims(res).rows("quick", configs=_write_configs(tmp_path)), "e", "sst2")
    assert r.verdict == verdict
    assert text in r.ours and "`sst2-head_only-dp`" in r.ours and f"FFA {ffa_adapter:,} vs FedAvg 10,000" in r.ours


def _het(cells, part="dir0.1"):
    """Heterogeneity result from {method: [per-seed accuracy]} on 20 Newsgroups at one partition (+ IID)."""
    rows = [dict(task="20news", method=m, partition=p, seed=s, acc=a, run=f"20news-{p}-{m}",
                 cum_up_MB=100.0 if m == "fedavg_fft" else 4.0)
            for m, accs in cells.items() for p in ("iid", part) for s, a in enumerate(accs)]
    return {"heterogeneity": Heterogeneity(cells=None, seeds=pd.DataFrame(rows), peft_gap={})}


@pytest.mark.parametrize("slora,fraction,verdict", [([0.56, 0.54, 0.55], "0.75", "reproduced"),
                                                    ([0.42, 0.41, 0.43], "0.10", "refuted")])
def test_slora_gap_closed_fraction(tmp_path, slora, fraction, verdict):
    res = _het({"fedavg_fft": [0.61, 0.59, 0.60], "fedavg_lora": [0.41, 0.39, 0.40], "slora": slora})
    r = _find(claims(res).rows("quick", configs=tmp_path), "h", "20news")
    assert "α=0.1" in r.claim
    assert f"(+{100 * (sum(slora) / 3 - 0.40):.1f})/(+20.0) = {fraction}" in r.ours
    assert "cumulative upload 4 MB = 4.00% of FFT's 100 MB" in r.ours
    assert r.verdict == verdict


def test_upload_nonincreasing_after_the_initiating_stage():
    def rows(ups):
        return [dict(round=t, federation=0, seed=0, up_bytes=b) for t, b in enumerate(ups, start=1)]
    ok, seq, broken = upload_nonincreasing(rows([900, 900, 800, 600, 400, 400]), init_rounds=2, rounds=6)
    assert ok and seq == {0: [800, 600, 400, 400]} and not broken
    ok, _, broken = upload_nonincreasing(rows([900, 900, 800, 600, 700, 400]), init_rounds=2, rounds=6)
    assert not ok and broken == ["federation 0 round 4 → 5: 600 → 700 bytes"]
    ok, _, _ = upload_nonincreasing(rows([100, 100, 800, 600]), init_rounds=2, rounds=4)   # init: not checked
    assert ok


def _fake_run(root, name, method, accs, ups, method_cfg=None, label=None):
    d = root / "heterogeneity" / "quick" / name
    d.mkdir(parents=True)
    labels = {"task": "20news", "partition": "dir0.1", "method": label or method}
    (d / "run.json").write_text(json.dumps({"family": "heterogeneity", "name": name, "profile": "quick",
                                            "labels": labels}))
    cfg = {"task": "20news", "model": "all-MiniLM-L6-v2", "num_hidden_layers": 4, "num_clients": 10,
           "client_fraction": 0.3, "partition": {"name": "dirichlet", "alpha": 0.1}, "rounds": len(ups),
           "eval_every": 1, "lora": {"rank": 8, "alpha": 16.0}, "method": {"name": method, **(method_cfg or {})}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    feds = [dict(federation=i, seed=i, status="finished", final={"test": a}, cum_up_bytes=sum(ups))
            for i, a in enumerate(accs)]
    (d / "summary.json").write_text(json.dumps({"status": "finished", "federations": feds}))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps(dict(round=t, federation=i, seed=i, up_bytes=b, cum_up_bytes=sum(ups[:t]),
                        acc_test=a * t / len(ups))) + "\n"
        for i, a in enumerate(accs) for t, b in enumerate(ups, start=1)))


def test_sa_fedlora_upload_check_and_accuracy_from_run_directories(tmp_path):
    sa = {"init_rounds": 2, "heating_rounds": 1, "anneal_rounds": 2, "cooling_rank": 2}
    _fake_run(tmp_path, "20news-dir0.1-fedavg_fft", "fedavg_fft", [0.50, 0.52, 0.51], [10_000] * 6)
    _fake_run(tmp_path, "20news-dir0.1-fedavg_lora", "fedavg_lora", [0.40, 0.42, 0.41], [800] * 6)
    _fake_run(tmp_path, "20news-dir0.1-sa_fedlora", "sa_fedlora", [0.50, 0.52, 0.51],
              [800, 800, 800, 500, 200, 200], sa)
    _fake_run(tmp_path, "20news-dir0.1-sa_fedlora_full", "sa_fedlora", [0.30, 0.31, 0.29],
              [9_000, 9_000, 800, 500, 600, 200], {**sa, "init_stage": "full"}, label="sa_fedlora_full")
    rows = claims({}).rows("quick", root=tmp_path, configs=tmp_path / "no-configs")
    up = {r.claim.split(", ")[-1]: r for r in rows if r.id == "k" and "upload" in r.claim}
    assert up["sa_fedlora"].verdict == "reproduced"
    assert "non-increasing in all 3 federations" in up["sa_fedlora"].ours
    assert up["sa_fedlora_full"].verdict == "refuted"
    assert "round 4 → 5: 500 → 600 bytes" in up["sa_fedlora_full"].ours
    acc = {r.claim.split(", ")[-1]: r for r in rows if r.id == "k" and "accuracy" in r.claim}
    assert acc["sa_fedlora"].verdict == "reproduced"          # level with FFT, 10 points above LoRA
    assert acc["sa_fedlora_full"].verdict == "refuted"        # 21 points below FFT
    j = {r.claim.split(", ")[-1]: r for r in rows if r.id == "j"}
    assert j["sa_fedlora"].verdict == "reproduced"
    assert "reduction 94.50%" in j["sa_fedlora"].ours            # 1 - (3 x 800 + 500 + 2 x 200) / (6 x 10,000)
    assert "init_rounds 2" in j["sa_fedlora"].ours and "rounds 1–2" in j["sa_fedlora"].ours
    assert "93.62%" in j["sa_fedlora"].paper_number and "[abstract]" in j["sa_fedlora"].paper_number


def test_exact_half_sizes_the_head_from_its_shape_without_a_head_only_run(tmp_path):
    """No head_only run: the head is (labels x hidden + labels) float32 per client-round, hidden from the model's
    config (MiniLM: 384), over rounds x clients per round read from the run's config.yaml."""
    head = (2 * 384 + 2) * 4 * 2 * 3                                     # 2 rounds x 3 clients
    res = _bytes_frame(head + 5000, head + 10000, head)
    seeds = res["ffa_table"].seeds
    seeds = seeds[seeds.method != "head_only"].assign(run=lambda d: "sst2-" + d["method"] + "-dp")
    for name in sorted(set(seeds["run"])):
        d = tmp_path / "ffa_table" / "quick" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"family": "ffa_table", "name": name, "labels": {}}))
        (d / "config.yaml").write_text(yaml.safe_dump({"task": "sst2", "model": "all-MiniLM-L6-v2", "rounds": 2,
                                                       "num_clients": 3, "client_fraction": 1.0}))
    res = {"ffa_table": FFATable(cells=None, seeds=seeds)}
    r = _find(claims(res).rows("quick", root=tmp_path, configs=tmp_path / "none"), "e", "sst2")
    assert "the head from its shape, stated as such: (2 × 384 + 2) float32 = 3,080 bytes per client-round × 6" \
        in r.ours
    assert r.verdict == "reproduced"


@pytest.mark.parametrize("sst2_gap,verdict", [(0.01, "reproduced"), (0.20, "refuted"), (0.09, "underpowered")])
def test_gap_largest_on_mnli_compares_the_task_intervals(tmp_path, sst2_gap, verdict):
    noise = [0.0, 0.01, -0.01]
    rows = [dict(task=t, method=m, privacy="non-private", seed=s, acc=base + (gap if m == "ffa_lora" else 0) + e,
                 run=f"{t}-{m}-nonprivate")
            for t, base, gap in (("mnli", 0.5, 0.10), ("sst2", 0.7, sst2_gap)) for m in ("ffa_lora", "fedavg_lora")
            for s, e in enumerate(noise if m == "ffa_lora" else [0, 0, 0])]
    seeds = pd.DataFrame(rows)
    res = {"ffa_table": FFATable(cells=None, seeds=seeds)}
    r = _find(claims(res).rows("quick", configs=_write_configs(tmp_path)), "d", "non-private")
    assert r.verdict.startswith(verdict)
    assert "mnli +10.0" in r.ours


def _ranges(rng, std=0.01, seeds=2, learned=3):
    return dict(range=rng, mean_std=std, cells=3, min_seeds=seeds, learned_cells=learned)


@pytest.mark.parametrize("ffa,fedavg,verdict", [
    (_ranges(0.01), _ranges(0.20), "reproduced"),
    # both collapse at one α: FFA-LoRA moves with α too, whatever FedAvg-LoRA does (a smaller range is no claim)
    (_ranges(0.287), _ranges(0.306), "refuted (FFA-LoRA's accuracy moves with α)"),
    (_ranges(0.01), _ranges(0.015), "inconclusive (neither method moves with α over this grid)"),
    (_ranges(0.01, seeds=1), _ranges(0.20, seeds=1), "underpowered"),
    (_ranges(0.01, learned=1), _ranges(0.20), "inconclusive (a method above chance at no more than half"),
])
def test_alpha_rule_reads_ffa_insensitivity_on_its_own_range(ffa, fedavg, verdict):
    """(f) is about FFA-LoRA: it is reproduced only when FFA-LoRA's range over α is within the tolerance
    (2 points or the seed std) while FedAvg-LoRA's is not; FFA-LoRA losing 29 points at one α is a refutation
    even if FedAvg-LoRA loses 31."""
    from scripts.figures.claims import _range_rule
    assert _range_rule(ffa, fedavg)[1].startswith(verdict)
