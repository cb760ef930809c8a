# llavadi — two commands on a fresh machine: `make demo` and `make test`.
# Both create/update .venv themselves (idempotent: re-running setup is a no-op once the stamp
# is newer than the dependency files).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llavadi-setup
PYTEST_ARGS ?=

.PHONY: setup test demo demo-study demo-teacher bench docs clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt .ci/setup-venv.sh
	bash .ci/setup-venv.sh $(VENV)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the README's demo block (table, findings, chart) is rewritten from the run's results.json
demo: setup
	$(VENV)/bin/llavadi demo
	$(PY) -m llavadi.stages.demo.report demo README.md

# the LLAVADI study's ablation grid on the demo task (about 45 min on 2 cores); rewrites the README's study block
demo-study: setup
	$(VENV)/bin/llavadi demo --study
	$(PY) -m llavadi.stages.demo.study demo README.md

# rebuild the demo's shipped teacher (assets/demo_teacher, about 25 min on 2 cores); commit the result
demo-teacher: setup
	$(PY) -m llavadi.stages.demo.teacher_builder demo_teacher_build assets/demo_teacher

bench: setup
	$(PY) benchmarks/run_all.py

# README's config-key and CLI-option listings, regenerated from pipeline/config.py and cli.py
# (tests/test_docs.py fails while they are stale)
docs: setup
	$(PY) -m llavadi.pipeline.config_doc README.md

clean-venv:
	rm -rf $(VENV)
