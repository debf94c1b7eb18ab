# Two entry points that do all set-up on a fresh machine:
#   make serve   create .venv, install stratasnap, run `stratasnap serve`
#   make test    create .venv, install stratasnap with its test tools, run every check
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint unit protos clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

serve: $(STAMP)
	$(VENV)/bin/stratasnap serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(ARGS)

protos: $(STAMP)
	scripts/gen-protos

clean:
	rm -rf $(VENV) build *.egg-info
