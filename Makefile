# make demo   - environment, ML-100K data and text features, stages 1-3 federated, popularity, one results table
# make test   - environment (if missing), then the test suite (WORKERS=2 processes)
# make test-quick - the same without the Flower deployments (a few minutes)
# make flower - add the optional Flower install (federated.backend: flower; CI installs it)
PYTHON ?= python3
BIN := .venv/bin
STAMP := .venv/.installed

.PHONY: demo test test-quick venv data flower

venv: $(STAMP)

# RecBole goes in last and without its declared dependencies: its metadata pins ray<=2.6.3, which
# does not import on numpy 2. requirements.txt lists what it really needs.
$(STAMP): requirements.txt
	$(PYTHON) -m venv .venv
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $(STAMP)

flower: .venv/.flower-installed

.venv/.flower-installed: requirements-flower.txt $(STAMP)
	$(BIN)/pip install -q -r requirements-flower.txt
	touch $@

data/ml-100k/ml-100k.inter: | $(STAMP)
	$(BIN)/python run.py prepare ml100k --out data --overwrite

data/ml-100k/text_minilm.npz: data/ml-100k/ml-100k.inter
	$(BIN)/python run.py prepare text --dataset-dir data/ml-100k --out $@ --overwrite

data: data/ml-100k/text_minilm.npz

demo: data
	$(BIN)/python run.py --config yamls/demo/stage1.yaml --overwrite
	$(BIN)/python run.py --config yamls/demo/stage2.yaml --overwrite
	$(BIN)/python run.py --config yamls/demo/stage3.yaml --overwrite
	$(BIN)/python run.py baseline --config yamls/demo/stage1.yaml --model Pop --set run_dir=runs/demo/popularity --overwrite
	@echo
	@echo "ML-100K has no images: stages 2 and 3 ran text-only (visual expert masked)."
	@echo "baseline-pop ranks every item by its training interactions: the floor a model must clear."
	$(BIN)/python run.py report --out runs/demo/report.json runs/demo/popularity runs/demo/stage1 runs/demo/stage2 runs/demo/stage3

# Two pytest-xdist workers, a module's tests in one of them (tests/conftest.py), and one torch thread
# each: at torch's default of a thread per core, two workers oversubscribe 2 cores and the suite takes
# more CPU and more time (docs/BENCHMARKS.md, "The test suite").
WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(WORKERS)

test: $(STAMP)
	$(PYTEST)

# everything but the Flower deployments (pytest.ini's `deployment` marker), which take most of the time
test-quick: $(STAMP)
	$(PYTEST) -m "not deployment"
