# Set up a virtual environment and run the demo or the tests. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.istr-installed

.PHONY: help setup demo test test-fast bench-codecs bench-matcher bench-speed bench-step clean

help:
	@echo "make demo          set up $(VENV) and run the demo (synthetic data -> PCA codec -> train -> eval -> runs/demo)"
	@echo "make bench-step    training-step time of this checkout vs 852437f vs Mask R-CNN (benchmarks/results)"
	@echo "make test          set up $(VENV) and run the test suite"
	@echo "make test-fast     the test suite without the slow end-to-end tests"
	@echo "make bench-codecs  codec benchmark on the real COCO masks in ../shared (writes benchmarks/results)"
	@echo "make bench-matcher / bench-speed   matcher and inference-latency benchmarks"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/istr demo --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q -rs --durations=10

test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow"

bench-codecs: setup
	$(BIN)/python benchmarks/codecs.py --out benchmarks/results

bench-matcher: setup
	$(BIN)/python benchmarks/matcher.py

bench-speed: setup
	$(BIN)/python benchmarks/speed.py

bench-step: setup
	$(BIN)/python benchmarks/step_time.py --baseline 852437f

clean:
	rm -rf $(VENV) runs .pytest_cache
