# vtoken: `make run` benchmarks every plugin against the unplugged model (quick); `make test` runs the suite;
# `make demo` starts the Gradio demo app; `make gpu-check` runs the checks a CUDA machine must confirm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install run demo test gpu-check peers-venv peers lint constraints clean

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

# kvpress (the peer of `vtoken bench peers`) needs transformers < 5.3 and patches transformers'
# attention table on import: its own venv, layered over .venv (a .pth file), like .ci/run's.
PEERS := .venv-peers
$(PEERS)/.installed: $(STAMP)
	rm -rf $(PEERS) && $(PY) -m venv $(PEERS)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$$($(PEERS)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vtoken-base.pth"
	$(PEERS)/bin/python -m pip install -q --disable-pip-version-check kvpress==0.5.5 transformers==5.2.0
	$(PEERS)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

peers-venv: $(PEERS)/.installed

peers: $(PEERS)/.installed
	$(VENV)/bin/vtoken bench peers

gpu-check: $(STAMP)
	$(PY) -m vtoken.bench.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check vtoken plugins tests demos

constraints: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
