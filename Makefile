# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo demo-stop bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	# Flower, the baseline of bench.aggregate/bench.wire, pins fastapi/protobuf against
	# Airflow 3.3 (see pyproject.toml): only its numpy code is used, so no deps.
	$(BIN)/pip install --quiet --no-deps "flwr==1.42.0" "pycryptodome>=3.18,<4" "iterators==0.0.2"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/python -m scripts.demo start

demo-stop: $(STAMP)
	$(BIN)/python -m scripts.demo stop

bench: $(STAMP)
	mkdir -p bench/results
	$(BIN)/python -m bench.make_dataset --out bench/results/dataset.npz
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 5 --paired dense32 --json > bench/results/quality-autoencoder.json
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 5 --kind gaussian --json > bench/results/quality-gaussian.json
	$(BIN)/python -m bench.aggregate --json > bench/results/aggregate.json
	$(BIN)/python -m bench.wire --json > bench/results/wire.json
	$(BIN)/python -m bench.client --dataset bench/results/dataset.npz --json > bench/results/client.json

clean:
	rm -rf $(VENV) .state
