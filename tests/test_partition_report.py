"""scripts.partition_report end to end on RTE (small)."""
import numpy as np
import pandas as pd
import pytest

from fedsim import tasks
from scripts import partition_report


def test_report_files(tmp_path, capsys):
    paths = partition_report.main(["--task", "rte", "--partition", "dirichlet", "--alpha", "0.5", "--clients", "5",
                                   "--seed", "1", "--out", str(tmp_path)])
    names = [p.name for p in paths]
    assert names == [f"rte_dirichlet_a0.5_c5_s1.{ext}" for ext in ("csv", "md", "png")]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert str(paths[0]) in capsys.readouterr().out
    table = pd.read_csv(paths[0], index_col="client")
    labels = tasks.load_labels("rte")
    assert len(table) == 5 and table["size"].sum() == len(labels) == 2490
    assert table[["entailment", "not_entailment"]].sum().tolist() == np.bincount(labels).tolist()
    assert "| client | size | entailment | not_entailment |" in paths[1].read_text()


def test_report_shards_subsample(tmp_path):
    paths = partition_report.main(["--task", "20news", "--partition", "shards", "--labels-per-client", "2",
                                   "--clients", "10", "--subsample", "1000", "--out", str(tmp_path)])
    table = pd.read_csv(paths[0], index_col="client")
    assert paths[0].name == "20news_shards_k2_n1000_c10_s0.csv"
    assert table["size"].sum() == 1000 and ((table.drop(columns="size") > 0).sum(axis=1) == 2).all()


@pytest.mark.parametrize("argv,match", [
    (["--task", "glue", "--partition", "iid", "--clients", "3"], "unknown task"),
    (["--task", "rte", "--partition", "zipf", "--clients", "3"], "unknown partition"),
    (["--task", "rte", "--partition", "dirichlet", "--clients", "3"], "needs parameter"),
    (["--task", "rte", "--partition", "dirichlet", "--alpha", "0", "--clients", "3"], "alpha must be"),
    (["--task", "rte", "--partition", "iid", "--alpha", "1", "--clients", "3"], "takes no parameter"),
    (["--task", "rte", "--partition", "shards", "--labels-per-client", "3", "--clients", "3"], "exceeds"),
    (["--task", "rte", "--partition", "iid", "--clients", "0"], "num_clients"),
    (["--task", "rte", "--partition", "iid", "--clients", "5000"], "num_clients"),
])
def test_report_bad_args(tmp_path, argv, match):
    with pytest.raises(SystemExit) as e:
        partition_report.main(argv + ["--out", str(tmp_path / "out")])
    assert match in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written
