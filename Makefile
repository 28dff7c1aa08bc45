# `make demo` and `make test` build their own CPU environment (.venv) on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo_output
# torch 2.14.1 is the build this project's CI machines carry; any torch >= 2.8 works (see requirements.txt).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-deps clean

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-fp8.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 PY=$(PY) DEMO=$(DEMO) bash tools/demo.sh

# SLURM and shellcheck (tests/test_slurm.py) and Chromium (tests/test_evaluate.py): installed with apt-get (as root)
# when missing, at once when present.
test-deps:
	bash tools/setup_test_deps.sh

# Format and lint first (a violation fails the run), then the suite; prints how long it all took.
test: $(VENV)/.installed test-deps
	@start=$$(date +%s); \
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check . && \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests; status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$status

clean:
	rm -rf $(DEMO)
