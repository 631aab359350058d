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

.PHONY: install chromium test test-fast test-1thread test-s3 s3-requests demo bench wheelhouse clean

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

install: $(STAMP) chromium

# The report's browser test (tests/flows/test_report.py) renders the page in Debian's chromium.
# Installed when missing, if this runs as root with apt-get (CI: a fresh machine, as root);
# anywhere else, or if apt-get fails, it says so and the browser test is skipped. Never fails.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the report's browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: apt-get could not install chromium: the report's browser test will be skipped"; \
	else echo "note: chromium is not installed (as root: apt-get install -y chromium): the report's browser test will be skipped"; fi

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The store tests and the crash / repair flow tests at one torch thread, as Dask workers run
# (OMP_NUM_THREADS=1): what a rerun or a repair recomputes must equal the first run's outputs bit
# for bit at any thread count (docs/design.md, "An item's outputs depend on that item alone").
# Not here: tests/tasks/test_group_independence.py and tests/flows/test_rerun_grouping.py set 1 and 2
# threads themselves, and the Dask test's workers always run with one thread (all in `make test`).
# About 2.5 min on 2 cores (8 min while they were busy); CI (.ci/run) runs it after `make test`.
ONE_THREAD_TESTS := tests/storage tests/flows/test_trustworthy.py tests/flows/test_crash_and_runners.py \
	--deselect tests/flows/test_crash_and_runners.py::test_dask_local_cluster_gives_the_same_outputs
test-1thread: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest $(ONE_THREAD_TESTS) $(PYTEST_ARGS)

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

# Wheels of the packages the GPU benchmark (bench/gpu.sh) needs beyond PyTorch, timm, numpy, pyarrow and
# scikit-learn, for each CPython version in WHEEL_PYTHONS (3.12: the lent GPU machines' python3; add
# this machine's to try gpu.sh here). Pure-Python wheels are shared; compiled ones are per version.
WHEEL_PYTHONS ?= 3.12 $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
WHEELHOUSE ?= bench/out/wheels

wheelhouse:
	@mkdir -p $(WHEELHOUSE)
	@for v in $(sort $(WHEEL_PYTHONS)); do \
	  $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $$v --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
	    --platform manylinux1_x86_64 -d $(WHEELHOUSE) -r bench/gpu-requirements.txt || exit 1; \
	done
	@du -sh $(WHEELHOUSE)

clean:
	rm -rf ovseg-store demo-out .pytest_cache labels report overlay.png overlay_labels.png
