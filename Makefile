# enrich: `make demo` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PREFECT_LOGGING_LEVEL ?= WARNING
# the ephemeral server's SQLite answers 503 while it is busy (seen once during a 1M-product nightly, for ~2 min):
# let the client retry for ~8 min (exponential back-off) and let a statement wait 30 s, not 10, for the database
export PREFECT_CLIENT_MAX_RETRIES ?= 8
export PREFECT_SERVER_DATABASE_TIMEOUT ?= 30
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test lint docker-check bench bench-ingest bench-dedupe bench-quality bench-enrich bench-scale bench-scale-1m bench-precision bench-dedupe-quality bench-dedupe-quality-cross bench-dedupe-flow clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found); set PYTHON=/path/to/python3.11"; exit 1; }
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 8 ] || echo "warning: $$free GiB free \
	here; the venv (torch's CUDA build) needs about 8 GiB: free space (old clones, data/bench) if pip fails with ENOSPC"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,dask]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/enrich demo

test: $(STAMP)
	$(PY) -m pytest -q tests

docker-check: $(STAMP)  ## offline checks of docker/ (compose config, hadolint); no Docker engine needed
	$(PY) -m pytest -q tests/test_docker.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: bench-ingest bench-dedupe bench-quality bench-enrich bench-scale bench-dedupe-quality

bench-ingest: $(STAMP)
	$(PY) bench/ingest.py

bench-dedupe: $(STAMP)
	$(PY) bench/dedupe.py

bench-quality: $(STAMP)
	$(PY) bench/quality.py

# trees on pair features + SupCon fine-tuning (4 epochs) for all five sets (4-12 min per set on 2 busy cores); the
# cross-encoder blend (about 40 min per set) is `bench-dedupe-quality-cross`
bench-dedupe-quality: $(STAMP)
	$(PY) bench/dedupe_quality.py --epochs 0
	$(PY) bench/cluster_quality.py

bench-dedupe-quality-cross: $(STAMP)
	$(PY) bench/dedupe_quality.py --benchmarks Abt-Buy wdc/computers --epochs 2 --max-length 64 --summarize 16 --lr 8e-5

# the product's own commands on the Ditto benchmarks (import, train matcher with SupCon, dedupe): ~40 min
bench-dedupe-flow: $(STAMP)
	$(PY) bench/dedupe_flow.py

bench-enrich: $(STAMP)
	$(PY) bench/enrich.py

bench-scale: $(STAMP)
	$(PY) bench/scale.py --sizes 10000,20000,100000 --images-up-to 10000

# the million-product nightly (text-only fast path: int8 JAVE, char n-gram dedupe; 34-36 min measured), its full run then reruns
# with one product and 0.1%, 0.5%, 1% and 5% changed (a least-squares fit of cost on the change): outside `make bench`
bench-scale-1m: $(STAMP)
	$(PY) bench/scale.py --sizes 1000000 --images-up-to 0 --dedupe-method chars --runs one,tenth,changed \
		--curve 0.005,0.05 --out bench/results/scale_1m.json

bench-precision: $(STAMP)
	$(PY) bench/precision.py --dataset ae-110k --data-path ../shared/data/ae-110k

clean:
	rm -rf data/warehouse data/demo mlruns/mlflow.db mlruns/artifacts .prefect
