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

.PHONY: check-monitor chromium install install-deepspeed demo demo-pretrain demo-images test test-fast lint clean

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

# DeepSpeed (the engine tests run ZeRO-2/3 on CPU processes): a source-only package whose build imports torch, so it
# is built in this venv (no build isolation), without compiling its ops (DS_BUILD_OPS=0; CPU and JIT need none).
install-deepspeed: $(VENV)/.deepspeed

$(VENV)/.deepspeed: $(VENV)/.installed
	$(BIN)/pip install wheel setuptools
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation -e ".[deepspeed]"
	touch $@

# One pytest process per core (TEST_PROCESSES), sharing out the test files (tests/conftest.py); the others' output
# is printed after the first's. Fails when any of them fails.
TEST_PROCESSES ?= 2
test: install install-deepspeed chromium
	@shared=$$(mktemp -d) && status=0 && pids="" && \
	for i in $$(seq 2 $(TEST_PROCESSES)); do \
		HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests --share-files-with $$shared $(PYTEST_ARGS) \
			> $$shared/process-$$i.log 2>&1 & pids="$$pids $$!"; \
	done; \
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests --share-files-with $$shared $(PYTEST_ARGS) || status=1; \
	for pid in $$pids; do wait $$pid || status=1; done; \
	for i in $$(seq 2 $(TEST_PROCESSES)); do echo "== pytest process $$i of $(TEST_PROCESSES)"; \
		cat $$shared/process-$$i.log; done; \
	rm -rf $$shared; exit $$status

# The reward-hacking monitor over seeds (needs `make demo` first; about 2 x 3 minutes per seed on a CPU).
check-monitor: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/hacking_monitor_seeds.py --seeds $${SEEDS:-1}

# Headless Chromium renders the report in tests/test_report.py (Debian package `chromium`; needs root to install).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium) || \
		echo "could not install chromium: the report's headless-rendering test will be skipped"

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf outputs .pytest_cache
