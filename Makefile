# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU wheel that lies on these machines; installing
	# it first keeps any other dependency from pulling a newer (CUDA) build.
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# On a loopback address `make serve` runs without API keys (EDIFFI_ALLOW_ANONYMOUS=true, logged
# at start-up) unless EDIFFI_API_KEYS or EDIFFI_ALLOW_ANONYMOUS is set; on any other address it
# needs EDIFFI_API_KEYS.
LOOPBACK := $(filter 127.0.0.1 localhost ::1,$(HOST))
serve: install
	EDIFFI_ALLOW_ANONYMOUS=$${EDIFFI_ALLOW_ANONYMOUS:-$(if $(LOOPBACK),true,false)} \
	  $(PY) -m ediffi serve --host $(HOST) --port $(PORT)

# Starts a private redis-server on a free port unless EDIFFI_REDIS_URL is set.
test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
