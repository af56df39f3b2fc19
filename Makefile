# make demo : install into .venv (created or reused), prepare Shakespeare, train configs/demo.yaml on 4 ranks
#             (DEMO_JOB=configs/demo-10min.yaml: the same job cut to about 10 minutes, at a worse loss)
# make test : install, then run the default test suite (slow tests excluded; `make test-slow` runs them)
# make lint : ruff check . (rules in pyproject.toml)
# make bench: the pipeline-bubble benchmark (1F1B vs interleaved, sleep-modelled stages, ~3 min) and the
#             step-time benchmarks (PP1 step profile, PP2 stage balance, attention layers at 32k, fused head + loss,
#             the demo's start from submit to the first step; one table in runs/bench/step_time.md); JSON in
#             runs/bench/; the other benchmarks/ scripts run one by one, see BENCHMARKS.md
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow lint clean

install: $(STAMP)

# torch first, pinned to the local CPU build, so nothing later resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

datasets/shakespeare/dataset.json: $(STAMP)
	$(VENV)/bin/v4train prepare-data --source shakespeare --out datasets/shakespeare

DEMO_JOB ?= configs/demo.yaml

demo: $(STAMP) datasets/shakespeare/dataset.json
	$(VENV)/bin/v4train submit $(DEMO_JOB) --cluster clusters/local-sim.yaml --run-dir runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs datasets

.PHONY: bench
bench: $(STAMP)
	$(PY) benchmarks/pipeline_bubble.py --out runs/bench/pipeline_bubble.json
	$(PY) benchmarks/step_time.py --out runs/bench

# make gpu-check OUT=DIR : the device check on one GPU (benchmarks/gpu_check.py; under 8 minutes on an H200),
#                          gpu_check.json + gpu_check.md in DIR. Runs without installing v4train (the GPU
#                          machine's Python), so it uses $(PYTHON), not the venv.
OUT ?= runs/gpu_check
.PHONY: gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(OUT)
