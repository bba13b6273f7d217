# vtoken: `make run` benchmarks every plugin against the unplugged model (quick); `make test` runs the suite;
# `make demo` starts the Gradio demo app; `make gpu-check` runs the checks a CUDA machine must confirm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install run demo test gpu-check lint constraints clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[dev,demo,robot,ray]"
	touch $@

run: $(STAMP)
	$(VENV)/bin/vtoken bench --quick

demo: $(STAMP)
	$(VENV)/bin/vtoken demo

test: $(STAMP)
	$(PY) -m pytest -q

gpu-check: $(STAMP)
	$(PY) -m vtoken.bench.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check vtoken plugins tests demos

constraints: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
