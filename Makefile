# `make demo` and `make test` do all set-up themselves: a .venv with the package installed,
# torch pinned to the 2.13.0 CPU build through constraints.txt; `make test` also the OS packages of the
# services its tests start (scripts/os_packages.sh: PostgreSQL's server, where it can).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-search bench-search-quick bench-proxy bench-ask bench-students bench-scaling \
	bench-latency bench-latency-table bench-load bench-soak bench-distill clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/autocomp search studies/digits.yaml

test: setup
	bash scripts/os_packages.sh
	$(BIN)/ruff check autocomp tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -m "not alone"  # two processes (pyproject.toml), then the tests that run alone
	$(BIN)/pytest -m alone -n 0

bench: setup
	$(BIN)/python benchmarks/storage.py

PEER := $(VENV)/.peer

$(PEER): $(STAMP)  # the peer (NVIDIA Model Optimizer's FastNAS) for the search benchmark only
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,peer]"
	touch $(PEER)

bench-search: setup $(PEER)  # about 1.5 hours here: 3 tasks x (grid, autocomp x 2 seeds, FastNAS)
	$(BIN)/python benchmarks/search_quality.py

bench-search-quick: setup  # about 10 minutes here: digits, the grid against autocomp (the shipped study)
	$(BIN)/python benchmarks/search_quality.py --quick

bench-proxy: setup  # about 30 minutes here: Kendall tau of the cheap rung against full trials
	$(BIN)/python benchmarks/proxy_quality.py

bench-ask: setup  # about 5 minutes here: the samplers' time to ask at 100 and 1,000 stored trials
	$(BIN)/python benchmarks/ask_time.py

bench-students: setup  # about 20 minutes here: does the shipped space's student choice help?
	$(BIN)/python benchmarks/search_quality.py --methods autocomp no_students --name search_quality_students

bench-scaling: setup  # about 6 minutes here: 1 and 2 local workers, a 2-node Ray cluster, latency under load
	$(BIN)/python benchmarks/scaling.py

# one worker's runs of bench-load: side by side (they sleep), one file per backend
LOAD_ONE := benchmarks/results/load_one

bench-load: setup  # about 35 minutes here: trials that sleep, 1 to 64 at once, on a journal, PostgreSQL and Ray
	for b in postgresql ray journal; do $(BIN)/python benchmarks/load.py --concurrency 1 --trials 150 --backends $$b \
		--out $(LOAD_ONE)_$$b.md & done; wait
	$(BIN)/python benchmarks/load.py --concurrency 32 8 64 --include $(LOAD_ONE)_*.json

bench-distill: setup  # about 11 minutes here (the teachers cached; the transformer teacher's first training adds 8)
	$(BIN)/python benchmarks/distill_modes.py

bench-soak: setup  # under a minute here: 300 trials in one process, its memory and per-trial overhead
	$(BIN)/python benchmarks/soak.py

bench-latency: setup  # about a minute here, on an idle machine: repeatability and load accounting of the protocol
	$(BIN)/python benchmarks/latency.py

bench-latency-table: setup  # about 10 minutes here: does the latency table rank what the artifacts measure?
	$(BIN)/python benchmarks/latency_table.py

lint: setup
	$(BIN)/ruff check autocomp tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) studies/*.db studies/*.journal studies/*_artifacts .pytest_cache
