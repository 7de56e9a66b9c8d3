# Two commands on a fresh machine: `make run` (the whole pipeline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# batchscore reads .env itself; Metaflow and boto3 read only the environment, so every
# command runs with .env exported when there is one (no .env: embedded defaults).
WITH_ENV := set -a; [ ! -f .env ] || . ./.env; set +a;

.PHONY: install run train score lookup status test test-fast lint clean stop-embedded

# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set (containers, CI)
# every Metaflow task would otherwise compile the project again (~0.2 s a process).
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m compileall -q src
	touch $@

install: $(VENV)/.installed

run: train score lookup

train: install
	$(WITH_ENV) $(PY) metaflow/train_models.py run

score: install
	$(WITH_ENV) $(PY) metaflow/batch_processing.py run

status: install
	$(WITH_ENV) $(PY) -m batchscore status

lookup: status
	$(WITH_ENV) $(PY) -m batchscore lookup --sample 5

# The loop while you work: no flow, no service, nothing slow (well under a minute).
test-fast: install
	$(PY) -m pytest -m "not flows and not services and not slow"

# All of it (what CI runs, .ci/run): every flow, every service, the fresh-virtualenv installs;
# one pytest worker per core (tests sharing the session's training run on one worker).
test: install
	$(PY) -m pytest -n auto --dist loadgroup

lint: install
	$(PY) -m ruff check src tests metaflow benchmarks

stop-embedded: install
	$(WITH_ENV) $(PY) -m batchscore stop-embedded

clean: stop-embedded
	rm -rf .batchscore .metaflow
