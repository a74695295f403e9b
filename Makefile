# Two commands for a new user (see README.md):
#   make pretrain   set up .venv, build the default data, run the default pretraining
#   make test       set up .venv and run lint + the test suite
PYTHON ?= python3
# The torch to install first. The CPU wheel here; on a GPU cluster, e.g. TORCH="torch==2.13.0"
# from your CUDA index, or install torch into .venv yourself before `make setup`.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds a comm op once per environment; keep the build with this venv so other
# environments on the machine neither rebuild it nor race on it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup pretrain pretrain-moe test lint clean-data

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	@# With a CUDA torch, setup.py builds csrc/ against it, which pip's build isolation would hide
	@# (the kernels would then silently not build); a CPU torch has nothing to build against.
	if $(BIN)/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then \
		$(BIN)/python -m pip install -q "setuptools>=68" wheel && \
		$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]' && \
		$(BIN)/python -c 'from megatron_llm import kernels; print("kernels:", kernels.status())'; \
	else \
		$(BIN)/python -m pip install -q -e '.[test]'; \
	fi
	touch $@

setup: $(STAMP)

pretrain: $(STAMP)
	PATH="$(BIN):$$PATH" bash launch/default_run.sh

# The default run as a tiny mixture of experts: every MLP 4 experts of half its width, top-2 (the
# dense run's active FLOPs), split over the 2 CPU ranks by expert parallelism. On one GPU add
# parallel.ep=1 (ep must divide the number of data-parallel ranks).
MOE_TINY := model.moe.num_experts=4 model.moe.top_k=2 model.moe.expert_ffn_hidden_size=256 \
	parallel.ep=2 logging.dir=runs/default-moe checkpoint.dir=runs/default-moe/checkpoints
pretrain-moe: $(STAMP)
	PATH="$(BIN):$$PATH" bash launch/default_run.sh $(MOE_TINY)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean-data:
	rm -rf data/default runs/default
