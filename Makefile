# Two commands do all the set-up on a fresh machine:
#   make demo   installs (first time only), fetches the demo scans (scripts/demo_data.sh) and segments them with
#               `trtseg demo`: `trtseg predict` on the embedded default (CPU engine; two cases run in one process,
#               DEMO_FLAGS=--ray-from-cases=1 runs them as the Ray job), QC pictures, Dice
#   make test   installs (first time only) and runs the test suite; .ci/run calls exactly this
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

data/demo/.fetched: scripts/demo_data.sh
	PYTHON=$(PY) bash scripts/demo_data.sh data/demo
	touch $@

demo: install data/demo/.fetched
	$(VENV)/bin/trtseg demo --data data/demo --output out/demo $(DEMO_FLAGS)

test: install data/demo/.fetched
	$(PY) -m pytest -q tests
