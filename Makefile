# Two commands do all the set-up on a fresh machine:
#   make demo   installs (first time only) and runs `trtseg predict` on the embedded default (local Ray, CPU engine)
#   make test   installs (first time only) and runs the test suite; .ci/run calls exactly this
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

demo: install
	$(VENV)/bin/trtseg demo --output out/demo

test: install
	$(PY) -m pytest -q tests
