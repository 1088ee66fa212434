# Two commands on a fresh Debian/Ubuntu machine with Python >= 3.11:
#   make run    start the node on the embedded defaults (port 11112, state in ./state, CPU engine)
#   make test   install the test tools (DCMTK, dicom3tools, Orthanc) if missing, then run every test

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test test-fast bench tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
# torch's CPU build for the [import] extra (bundles import-nnunet): the +cpu wheel in pip's find-links
# (/opt/wheels), else PyTorch's CPU index; never the default CUDA build and its NVIDIA wheels.
	$(BIN)/pip install --quiet 'torch==2.13.0+cpu' -f /opt/wheels \
	  || $(BIN)/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install --quiet -e '.[test,import]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dicom-seg-node serve $(ARGS)

tools:
	./scripts/install-test-tools

test: $(STAMP) tools
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP) tools
	$(BIN)/python benchmarks/receive_and_turnaround.py --slices 300 --repeats 3 --scrape

clean:
	rm -rf $(VENV) state .pytest_cache
