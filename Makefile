# make demo   - environment, ML-100K data and text features, stages 1-3 federated, popularity, one results table
# make test   - environment (if missing), then the test suite (WORKERS=2 processes)
# make flower - add the optional Flower install (federated.backend: flower; CI installs it)
PYTHON ?= python3
BIN := .venv/bin
STAMP := .venv/.installed

.PHONY: demo test venv data flower

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

# two pytest-xdist workers: the Flower deployment tests mostly wait on their nodes, so a 2-core machine
# runs the rest beside them; one test at a time each (--maxschedchunk 1), as they take seconds to minutes
WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --maxschedchunk 1
