"""Rendering of one family from small synthetic runs (no training): what the DP-recipe table compares."""
import pandas as pd
import pytest

from scripts.figures.families.dp_recipe import RECIPE_REFERENCE, family_dp_recipe
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
    family_dp_recipe(w, runs, {"ffa_table_seeds": table})
    acc = pd.read_csv(tmp_path / "dp_recipe" / "quick" / "tables" / "accuracy.csv")
    ref = acc[acc.recipe == RECIPE_REFERENCE].set_index("method")["mean"]
    assert ref["fedavg_lora"] == pytest.approx(0.6133333, abs=1e-6)
    split = acc[acc.recipe == "head_split"].set_index("method")["mean"]
    assert split["ffa_lora"] == pytest.approx(0.8233333, abs=1e-6)
    diff = pd.read_csv(tmp_path / "dp_recipe" / "quick" / "tables" / "ffa_minus_fedavg.csv").set_index("recipe")
    assert diff.loc["head_split", "mean"] == pytest.approx(0.1033333, abs=1e-6)   # paired by seed
    assert diff.loc["head_split", "verdict"] == "reproduced"
    assert diff.loc[RECIPE_REFERENCE, "n"] == 3
