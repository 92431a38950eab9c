"""Rendering from small synthetic runs and tables (no training): DP-recipe table, claim verdicts, bytes to target."""
import numpy as np
import pandas as pd
import pytest

from scripts.figures.families.dp_recipe import RECIPE_REFERENCE, family_dp_recipe
from scripts.figures.results import Context, FFATable
from scripts.figures.style import Writer


def _run(name, method, recipe, accs, epsilon=1.0):
    feds = [dict(seed=s, final={"validation": a}, cum_up_bytes=1000, target_epsilon=epsilon, status="finished")
            for s, a in enumerate(accs)]
    return dict(name=name, meta={"labels": {"task": "sst2", "method": method, "recipe": recipe}},
                cfg={"task": "sst2", "method": {"name": method}, "lora": {"rank": 8, "alpha": 16}},
                summary={"status": "finished", "federations": feds})


def test_dp_recipe_sets_each_recipe_beside_the_ffa_table_cells_at_the_same_epsilon(tmp_path):
    runs = [_run("a", "fedavg_lora", "head_split", [0.70, 0.72, 0.74]),
            _run("b", "ffa_lora", "head_split", [0.80, 0.83, 0.84])]
    table = pd.DataFrame([dict(task="sst2", method=m, seed=s, epsilon=e, acc=acc)
                          for m, base in (("fedavg_lora", 0.60), ("ffa_lora", 0.76))
                          for e, shift in ((1.0, 0.0), (3.0, 0.2))          # ε=3 must not leak into the ε=1 column
                          for s, acc in enumerate([base + shift, base + shift + 0.01, base + shift + 0.03])])
    w = Writer(tmp_path, "dp_recipe", "quick")
    family_dp_recipe(w, runs, Context(tmp_path, "quick", {"ffa_table": FFATable(cells=None, seeds=table)}))
    acc = pd.read_csv(tmp_path / "dp_recipe" / "quick" / "tables" / "accuracy.csv")
    ref = acc[acc.recipe == RECIPE_REFERENCE].set_index("method")["mean"]
    assert ref["fedavg_lora"] == pytest.approx(0.6133333, abs=1e-6)
    split = acc[acc.recipe == "head_split"].set_index("method")["mean"]
    assert split["ffa_lora"] == pytest.approx(0.8233333, abs=1e-6)
    diff = pd.read_csv(tmp_path / "dp_recipe" / "quick" / "tables" / "ffa_minus_fedavg.csv").set_index("recipe")
    assert diff.loc["head_split", "mean"] == pytest.approx(0.1033333, abs=1e-6)   # paired by seed
    assert diff.loc["head_split", "verdict"] == "reproduced"
    assert diff.loc[RECIPE_REFERENCE, "n"] == 3


# ---------------------------------------------------------------------------------------------- claims

# The FFA-LoRA claim's verdicts (per task and epsilon) are tested in tests/test_claims.py.


def test_bytes_to_target_is_the_upload_when_accuracy_first_reaches_it():
    from scripts.figures.families.communication import bytes_to_target
    curves = pd.DataFrame([dict(run="r", federation=f, method="m", round=t, acc=acc, cum_up_MB=10.0 * t)
                           for f, accs in ((0, [0.5, 0.8, 0.7, 0.9]), (1, [0.5, 0.6, 0.7, 0.75]))
                           for t, acc in enumerate(accs, start=1)])
    got = bytes_to_target(curves.sample(frac=1.0, random_state=0), target=0.8).set_index("federation")["MB"]
    assert got[0] == 20.0                     # first reached in round 2, though it dips afterwards
    assert np.isnan(got[1])                   # never reached


def test_mb_to_target_is_void_when_any_seed_missed_it():
    """The reference FFT's bytes to target is the mean over all its seeds; one seed that never reached the
    target voids it instead of leaving the mean of the seeds that did (which flatters the reference)."""
    from scripts.figures.families.communication import mb_to_target
    bt = pd.DataFrame(dict(method=["fedavg_fft", "fedavg_fft", "slora", "slora"], MB=[10.0, np.nan, 2.0, 4.0]))
    mb, note = mb_to_target(bt, "fedavg_fft")
    assert np.isnan(mb) and note == "FedAvg-FFT missed it (1/2 seeds)"
    assert mb_to_target(bt, "slora") == (3.0, "-")


def test_tables_and_error_bars_show_the_95_percent_t_interval():
    """agg's `ci` is the t-interval half-width t(0.975, n-1) s / sqrt(n), not the std; one seed has none and
    the table says '1 seed' instead of a zero-width interval."""
    from scipy import stats

    from scripts.figures.load import agg
    from scripts.figures.style import fmt_pct
    df = pd.DataFrame(dict(method=["a", "a", "a", "b"], acc=[0.70, 0.72, 0.74, 0.6]))
    a = agg(df, ["method"]).set_index("method")
    assert a.loc["a", "ci"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.02 / np.sqrt(3))   # 4.30 x std / sqrt 3
    assert a.loc["a", "ci"] > 2 * a.loc["a", "std"]          # with 3 seeds the interval is far wider than 1 std
    assert np.isnan(a.loc["b", "ci"])
    assert fmt_pct(a.loc["a", "mean"], a.loc["a", "ci"], a.loc["a", "n"]) == "72.0 ± 5.0"
    assert fmt_pct(a.loc["b", "mean"], a.loc["b", "ci"], a.loc["b", "n"]) == "60.0 (1 seed)"


def test_profile_minutes_sum_the_families_timing(tmp_path):
    """The README's profile total is the sum of the families' measured timing.json wall_s, never typed."""
    import json

    from scripts.figures.readme import profile_minutes
    for fam, secs in (("ffa_table", 1762.96), ("alpha", 331.86)):
        (tmp_path / fam / "quick").mkdir(parents=True)
        (tmp_path / fam / "quick" / "timing.json").write_text(json.dumps({"wall_s": secs}))
    line = profile_minutes(tmp_path, "quick")[0]
    assert line.startswith("**Measured wall time of the quick profile: 34.9 min in all** (ffa_table 29.4, alpha 5.5")
    assert profile_minutes(tmp_path, "standard") == []


def test_table_csv_names_its_runs_commits_and_per_seed_values():
    """Every aggregated cell's csv row says where it came from: per-seed values, run directories, commits."""
    from scripts.figures.load import agg, sources
    df = pd.DataFrame(dict(method=["a", "a", "b"], acc=[0.74, 0.70, 0.6], seed=[1, 0, 0],
                           run=["r-a", "r-a", "r-b"], commit=["abc", "abc", "def"]))
    a = agg(df, ["method"]).set_index("method")
    assert sources(a.loc["a"]) == dict(ci=a.loc["a", "ci"], per_seed="0:0.7;1:0.74", runs="r-a", commits="abc")
    assert a.loc["b", "commits"] == "def"


def test_last_point_is_each_federations_accuracy_at_its_last_evaluated_round():
    """The target of bytes-to-target and of SLoRA's rounds-to-LoRA is read from the curve's last point, so under
    curve_eval_subsample it is on the same rows as the curve that must cross it (not the whole split's final)."""
    from scripts.figures.load import last_point
    cv = pd.DataFrame(dict(run=["r"] * 4 + ["s"] * 2, federation=[0, 0, 1, 1, 0, 0], round=[2, 4, 4, 2, 1, 3],
                           acc=[0.3, 0.5, 0.6, 0.4, 0.1, 0.2]))
    last = last_point(cv)
    assert list(zip(last["run"], last["federation"], last["round"], last["acc"])) == [
        ("r", 0, 4, 0.5), ("r", 1, 4, 0.6), ("s", 0, 3, 0.2)]
    assert last_point(cv.iloc[:0]).empty
