# gpsr: set-up, tests and the demo. Every target creates .venv when needed.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export PYTHONHASHSEED := 0
export WANDB_SILENT := true

.PHONY: install test test-fast lint demo demo-large demo-trust demo-parameterization clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

## The whole suite CI runs: lint, then fast tests plus the slow ones (DDP, resume, sweeps, CLI).
test: install
	.venv/bin/ruff check gpsr tests scripts
	.venv/bin/ruff format --check gpsr tests scripts
	$(PY) -m pytest -q --durations=15 tests

## Fast iteration: everything but the tests marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	.venv/bin/ruff check gpsr tests scripts
	.venv/bin/ruff format --check gpsr tests scripts

## Train both stages and the LR noise model on the bundled photos, evaluate, sweep NFEs and
## write the report (CPU).
demo: install
	bash scripts/demo.sh

## Whole images with the demo model: held-out strips, tiled vs whole, time and memory as the
## image grows (LR 64..512; LARGE_SIDES=64,...,1024 for more); after `make demo`.
demo-large: install
	PYTHONPATH=. $(PY) scripts/demo_large.py

## Trust under noise: noisy test tiles (sigma 0, 0.02, 0.05), noise-unaware and noise-aware
## GPSR (true and estimated sigma), projected, bicubic; writes demo/trust/; then calibrated
## intervals (demo/uncertainty/, docs/uncertainty.md); after `make demo`.
demo-trust: install
	PYTHONPATH=. $(PY) scripts/demo_trust.py
	PYTHONPATH=. $(PY) scripts/demo_uncertainty.py

## eps vs v vs x0 for the demo's latent DDPM (same flow, data and budget); after `make demo`.
demo-parameterization: install
	bash scripts/demo_parameterization.sh

clean:
	rm -rf outputs multirun demo .pytest_cache
