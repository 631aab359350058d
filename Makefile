# ovseg: the README's commands. Both work from a fresh clone on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.ovseg-installed
PYTEST_ARGS ?=
# The README's benchmark table was made with these arguments (about 30 minutes on 2 shared cores).
BENCH_ARGS ?= --images 1 --repeats 3 --dino vits16

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DO_NOT_TRACK ?= 1

.PHONY: install test test-fast test-s3 s3-requests demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# sam2 (SAM 2 region masks) is published only as a source archive whose isolated build would
# download a second torch: build it first, against this venv, without its optional CUDA kernel
# (SAM2_BUILD_CUDA=0; building without isolation needs setuptools >= 70.1 for bdist_wheel).
# The project then finds it installed. Its version is pinned in constraints.txt.

# Reinstall only when the project's install inputs change.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --upgrade-strategy only-if-needed -c constraints.txt 'setuptools>=70.1'
	SAM2_BUILD_CUDA=0 $(PIP) install --no-build-isolation --upgrade-strategy only-if-needed -c constraints.txt sam2
	$(PIP) install --upgrade-strategy only-if-needed -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The object-store tests alone: they start their own S3 server (moto) on a free localhost port.
test-s3: $(STAMP)
	$(PY) -m pytest tests/storage/test_s3_store.py tests/flows/test_s3_pipeline.py $(PYTEST_ARGS)

# The request counts of docs/object-stores.md (4 images, batch sizes 8 and 1; about 5 minutes).
s3-requests: $(STAMP)
	$(PY) -m tests.flows.test_s3_pipeline 4

demo: $(STAMP)
	$(VENV)/bin/ovseg demo

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf ovseg-store demo-out .pytest_cache
