# hfgen: `make demo` installs everything and runs the tiny RLHF pipeline; `make test` installs and runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Without an NVIDIA GPU, take the CPU build of torch: plain `pip install torch` resolves to a multi-GB CUDA build.
# The CPU wheel comes from PyTorch's CPU index (or a local wheel directory, e.g. PIP_FIND_LINKS).
TORCH_CPU_SPEC ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# With a GPU, pip's default torch (CUDA) is right; override e.g. TORCH_GPU_SPEC="torch==2.13.0" if you need a pin.
TORCH_GPU_SPEC ?= torch>=2.13
PYTEST_ARGS ?=

.PHONY: install demo demo-pretrain demo-images test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; \
		$(BIN)/pip install "$(TORCH_GPU_SPEC)"; \
	else \
		echo "No NVIDIA GPU: installing the CPU build of torch ($(TORCH_CPU_SPEC))"; \
		$(BIN)/pip install --retries 1 "$(TORCH_CPU_SPEC)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -e ".[dev,embeddings]"
	touch $@

# The main job on the embedded defaults: the three-step RLHF pipeline (tiny pretraining first when missing).
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/hfgen train recipes/tiny/rlhf.yaml

# Pretraining and generation only.
demo-pretrain: install
	HF_HUB_OFFLINE=1 $(BIN)/hfgen train recipes/tiny/pretrain.yaml
	HF_HUB_OFFLINE=1 $(BIN)/hfgen generate outputs/tiny/pretrain --prompt "the cat" --prompt "the red car" --num_samples 2

# Text-to-image from scratch on the embedded digits (2-core CPU: ~6 minutes): the VAE, then the text encoder and
# UNet (t2i stage), then the evaluation figures: prompt adherence, Fréchet distance, diversity, images/s.
# One torch thread unless OMP_NUM_THREADS says otherwise: on a CPU shared with other jobs, two OpenMP threads
# spin-wait for each other and a UNet step took 5-8x longer than with one. On an idle machine two are faster
# (4 minutes instead of 6): OMP_NUM_THREADS=2 make demo-images.
demo-images: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/hfgen train recipes/tiny/vae_digits.yaml
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/hfgen train recipes/tiny/t2i_digits.yaml
	@$(BIN)/python -c "import json; runs = ('outputs/tiny/vae', 'outputs/tiny/t2i'); \
	[print(f'{run}/{k:42} {v:.4g}' if isinstance(v, float) else f'{run}/{k:42} {v}') \
	 for run in runs for k, v in {**json.load(open(run + '/eval.json')), \
	 'wall_time_s': json.load(open(run + '/COMPLETE'))['wall_time_s']}.items()]"
	@echo "images: outputs/tiny/t2i/samples/grid.png, outputs/tiny/t2i/validation/"

test: install
	command -v chromium >/dev/null 2>&1 || apt-get install -y chromium || echo "no chromium: the report-opens test is skipped"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf outputs .pytest_cache
