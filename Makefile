# Nexus: `make run` starts the whole stack locally, `make test` runs the suite on a real Kafka.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where the local broker's jars and data live (localdev/home.py); a checkout keeps them in its
# git-ignored .cache/. Outside make the default is $XDG_CACHE_HOME/nexus or ~/.cache/nexus.
export NEXUS_HOME ?= $(CURDIR)/.cache

.PHONY: run test kafka-jars ollama check-python clean

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Nexus needs Python 3.11+ (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'

# constraints.txt: the exact versions the suite was tested with (pyproject.toml has the ranges).
$(STAMP): pyproject.toml constraints.txt | check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Rewrite constraints.txt from what .venv has now (after a dependency change; then `make test`).
.PHONY: constraints
constraints: $(STAMP)
	{ sed -n '/^#/p;/^#/!q' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

kafka-jars: $(STAMP)
	$(BIN)/python -c 'from localdev.broker import fetch_kafka; print("Kafka jars in", fetch_kafka())'

# A real Ollama (built once from its Go module, a few minutes) and the model smollm2:135m, cached
# in $(NEXUS_HOME); `nexus ollama` serves them. CI runs this before `make test`.
ollama: $(STAMP)
	$(BIN)/python -m localdev.ollama

run: $(STAMP) kafka-jars
	$(BIN)/nexus up

test: $(STAMP) kafka-jars
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (bug-finding rules) over the code, tests and benchmarks; mypy over the six packages.
# Both read their settings from pyproject.toml.
.PHONY: lint
lint: $(STAMP)
	$(BIN)/ruff check nexus schemas streams producers consumers localdev tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache
