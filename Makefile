# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser redis test test-fast lint demo demo-stop bench bench-quality docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	# Flower, the baseline of bench.aggregate/bench.wire, pins fastapi/protobuf against
	# Airflow 3.3 (see pyproject.toml): only its numpy code is used, so no deps.
	$(BIN)/pip install --quiet --no-deps "flwr==1.42.0" "pycryptodome>=3.18,<4" "iterators==0.0.2"
	# dp-accounting (fedlib.server.privacy's accountant) pins attrs<24, Airflow needs >=24.2; it
	# runs on the newer attrs, so without deps (its other deps are in the server extra).
	$(BIN)/pip install --quiet --no-deps "dp-accounting==0.6.0"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium and ChromeDriver for tests/test_plugin_browser.py (nothing is
# downloaded at test time). Installed with apt-get when missing, as root; otherwise the
# command to run is printed and the target fails.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
	  echo "browser: /usr/bin/chromium or /usr/bin/chromedriver is missing; as root run:"; \
	  echo "  apt-get update && apt-get install -y chromium chromium-driver"; \
	  exit 1; \
	fi

# Debian's redis-server, the Celery broker of tests/test_celery.py and bench.scaleout
# --executor celery: installed with apt-get when missing, as root (like browser).
redis:
	@if [ -x /usr/bin/redis-server ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	else \
	  echo "redis: /usr/bin/redis-server is missing; as root run:"; \
	  echo "  apt-get update && apt-get install -y redis-server"; \
	  exit 1; \
	fi

test: $(STAMP) browser redis lint
	$(BIN)/pytest

# The inner loop: unit tests only (no S3 server, no Airflow, nothing slow); CI runs `make test`.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not s3 and not airflow and not slow"

# ruff, the layer contracts of fedlib (import-linter) and the type check (mypy), all configured
# in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m scripts.demo start

demo-stop: $(STAMP)
	$(BIN)/python -m scripts.demo stop

# Performance (issue 6): every figure side by side in one run, JSON in bench/results/.
bench: $(STAMP) redis
	mkdir -p bench/results
	test -f bench/results/dataset.npz || $(BIN)/python -m bench.make_dataset --out bench/results/dataset.npz
	$(BIN)/python -m bench.aggregate --json > bench/results/aggregate.json
	$(BIN)/python -m bench.wire --json > bench/results/wire.json
	$(BIN)/python -m bench.client --dataset bench/results/dataset.npz --json > bench/results/client.json
	$(BIN)/python -m bench.round --json > bench/results/round.json
	$(BIN)/python -m bench.round --memory-check --json > bench/results/round-memory.json
	$(BIN)/python -m bench.scaleout --updates 10000 --repeat 3 --json > bench/results/scaleout.json
	$(BIN)/python -m bench.scaleout --updates 1000 --shard-size 100 --repeat 3 --json > bench/results/scaleout-1k.json
	$(BIN)/python -m bench.scaleout --updates 10000 --executor celery --json > bench/results/scaleout-celery.json
	$(BIN)/python -m bench.fleet --json > bench/results/fleet.json

# Model quality, poisoning, differential privacy and the real-data suite (about 1 hour on 2 cores).
bench-quality: $(STAMP)
	mkdir -p bench/results
	$(BIN)/python -m bench.make_dataset --out bench/results/dataset.npz
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 5 --paired dense32 --json > bench/results/quality-autoencoder.json
	$(BIN)/python -m bench.logquality --json > bench/results/logquality.json
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 5 --kind gaussian --json > bench/results/quality-gaussian.json
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 5 --kind gmm --json > bench/results/quality-gmm.json
	# Partial rounds: each device joins a round with chance 0.3 (the mixture with full and stepwise EM steps).
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 2 --rounds 60 --participation 0.3 --json > bench/results/quality-partial-autoencoder.json
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 2 --rounds 200 --participation 0.3 --json > bench/results/quality-partial-autoencoder-long.json
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 2 --rounds 60 --participation 0.3 --kind gmm --em-step 1.0 --json > bench/results/quality-partial-gmm.json
	$(BIN)/python -m bench.quality --dataset bench/results/dataset.npz --seeds 2 --rounds 60 --participation 0.3 --kind gmm --em-step 0.3 --json > bench/results/quality-partial-gmm-step.json
	$(BIN)/python -m bench.poisoning --dataset bench/results/dataset.npz --seeds 3 --robust fltrust,trimmed_mean,median --json > bench/results/poisoning.json
	$(BIN)/python -m bench.dp --dataset bench/results/dataset.npz --json > bench/results/dp.json
	$(BIN)/python -m bench.evalsplit --dataset bench/results/dataset.npz --seeds 5 --json > bench/results/evalsplit.json
	$(BIN)/python -m bench.targeted --seeds 3 --warmup 20 --rounds 12 --implant-fraction 2.0 --json > bench/results/targeted.json
	# Real data (bench/tasks.py): select on the validation split, then score the test holdout once.
	$(BIN)/python -m bench.select --json > bench/results/selection.json
	$(BIN)/python -m bench.suite --selection bench/results/selection.json --seeds 3 --json > bench/results/quality-suite.json

# The figure tables of README.md and RELIABILITY.md, rendered from bench/results/*.json
# (tests/test_docs.py fails when the committed documents differ from this rendering).
docs: $(STAMP)
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) .state
