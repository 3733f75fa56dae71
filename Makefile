# Build, test and tidy the mobiletl-edu package and its executable textbook.
#
#   make book   - set everything up, build the book strictly, say where it is
#   make test   - set everything up, run the whole pytest suite (book included)
#   make setup  - only the set-up step (idempotent, fast when nothing changed)
#   make student - the student edition: the book without solutions, with student notebooks
#   make assignments - the graded assignments, student and autograder versions, in _build/assignments
#   make device-test - build (once) the Pi 4 and Jetson Nano software stacks, run the device tests
#   make clean  - remove build outputs and caches (keeps .venv)
#   make distclean - clean, then also remove .venv and the offline assets

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JB := $(VENV)/bin/jb
PYTEST_ARGS ?=

# Launch buttons (Binder, Colab, and a JupyterHub if given) on every notebook page:
#   make book REPO_URL=https://github.com/ORG/REPO [JUPYTERHUB_URL=https://hub.example.org]
# (or repository.url / launch_buttons in _config.yml). Without a URL there are none.
REPO_URL ?=
JUPYTERHUB_URL ?=
CLASSROOM_ENV = MOBILETL_REPO_URL='$(REPO_URL)' MOBILETL_JUPYTERHUB_URL='$(JUPYTERHUB_URL)'

# torch and torchvision are pinned exactly: a loose requirement would make pip
# resolve a fresh multi-GB wheel instead of the release already on disk.
# Keep these pins identical to environment.yml (tests/test_environment.py checks).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXTRAS := test,book

# MathJax 3 is served from the built book itself, so pages typeset offline.
# npm installs it under $(ASSETS); `html_extra_path` in _config.yml copies
# $(ASSETS)/extra/_static/mathjax into _build/html/_static/mathjax.
MATHJAX_VERSION := 3.2.2
ASSETS := .book-assets
MATHJAX_DIR := $(ASSETS)/extra/_static/mathjax
MATHJAX_MARK := $(ASSETS)/mathjax-$(MATHJAX_VERSION).stamp

# The Python set-up is keyed on the content of pyproject.toml and the pins:
# change either and the next `make setup` reinstalls, otherwise it is a no-op.
SETUP_KEY := $(shell { cat pyproject.toml; echo '$(TORCH_PINS) $(EXTRAS)'; } | sha256sum | cut -c1-16)
SETUP_STAMP := $(VENV)/.setup-$(SETUP_KEY).stamp

CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Another apt or dpkg may hold the package lock (an unattended upgrade, a second install): wait for
# it up to APT_LOCK_WAIT seconds instead of failing at once. apt-get install waits by itself
# (DPkg::Lock::Timeout); apt-get update, which locks the package lists, is retried meanwhile.
APT_LOCK_WAIT ?= 600
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$(APT_LOCK_WAIT)
APT_INSTALL := $(APT_GET) install -y --no-install-recommends
APT_UPDATE := timeout $(APT_LOCK_WAIT) bash -c 'until $(APT_GET) update; do \
  echo ">> apt-get update failed (package lists locked?); trying again in 10 s"; sleep 10; done'

.PHONY: help setup python-env mathjax browser book student test assignments device-test clean distclean

help:
	@echo "make book   build the book strictly and open it (_build/html/index.html)"
	@echo "make test   run every test, the strict book build and browser check included"
	@echo "make setup  create .venv, install the package, MathJax and Chromium (idempotent)"
	@echo "            (make book installs no browser: only make test, whose browser check needs it)"
	@echo "make student  build the student edition (no solutions) into _build/student/_build/html"
	@echo "make assignments  build the graded assignments (otter-grader) into _build/assignments"
	@echo "make device-test  the bundle runner and the package on the Pi 4 / Jetson Nano stacks"
	@echo "make clean  remove build outputs and caches; make distclean also removes .venv"

setup: python-env mathjax browser

python-env: $(SETUP_STAMP)

$(PY):
	@if ! $(PYTHON) -m venv $(VENV); then \
	  echo ">> '$(PYTHON) -m venv' failed; installing Debian's python3-venv and retrying"; \
	  rm -rf $(VENV); \
	  $(APT_UPDATE); \
	  $(APT_INSTALL) python3-venv; \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(SETUP_STAMP): | $(PY)
	rm -f $(VENV)/.setup-*.stamp
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install $(TORCH_PINS) -e '.[$(EXTRAS)]'
	touch $@

mathjax:
	@if [ -f $(MATHJAX_MARK) ] && [ -f $(MATHJAX_DIR)/tex-mml-chtml.js ]; then \
	  echo ">> MathJax $(MATHJAX_VERSION) already in $(MATHJAX_DIR)"; \
	else \
	  if ! command -v npm >/dev/null; then \
	    echo ">> npm not found; installing Debian's npm"; \
	    $(APT_UPDATE); \
	    $(APT_INSTALL) npm; \
	  fi; \
	  rm -rf $(ASSETS); \
	  mkdir -p $(ASSETS)/npm $(ASSETS)/extra/_static; \
	  npm install --prefix $(ASSETS)/npm --no-save --no-package-lock --no-audit --no-fund --prefer-offline \
	    mathjax@$(MATHJAX_VERSION); \
	  cp -R $(ASSETS)/npm/node_modules/mathjax/es5 $(MATHJAX_DIR); \
	  cp $(ASSETS)/npm/node_modules/mathjax/LICENSE $(MATHJAX_DIR)/LICENSE; \
	  touch $(MATHJAX_MARK); \
	fi

browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
	  echo ">> Chromium and ChromeDriver present"; \
	elif command -v apt-get >/dev/null; then \
	  $(APT_UPDATE); \
	  $(APT_INSTALL) chromium chromium-driver; \
	else \
	  echo ">> WARNING: no apt-get: install Chromium and ChromeDriver as $(CHROMIUM) and $(CHROMEDRIVER)"; \
	  echo ">> for the browser test (it fails when CI=true and is skipped otherwise)."; \
	fi

book: python-env mathjax
	rm -rf _build/html/reports
	mkdir -p _build
	$(CLASSROOM_ENV) $(JB) build . -W -n --keep-going --all 2>&1 | tee _build/build.log
	@if [ -d _build/html/reports ] && [ -n "$$(ls -A _build/html/reports)" ]; then \
	  echo ">> notebook execution failures, see _build/html/reports/"; exit 1; \
	fi
	@echo
	@echo ">> The book is at $(CURDIR)/_build/html/index.html"
	@if [ -z "$${CI:-}" ]; then \
	  if [ -n "$${DISPLAY:-}$${WAYLAND_DISPLAY:-}" ] && command -v xdg-open >/dev/null; then \
	    xdg-open _build/html/index.html >/dev/null 2>&1 || true; \
	  elif [ -n "$${DISPLAY:-}$${WAYLAND_DISPLAY:-}" ] || [ "$$(uname)" = Darwin ]; then \
	    $(PY) -m webbrowser "file://$(CURDIR)/_build/html/index.html" >/dev/null 2>&1 || true; \
	  fi; \
	fi

# The student edition: the same pages with sphinx-exercise's solutions hidden, and student
# notebooks (solutions removed, an empty cell and a `check` under each exercise). REUSE=1 takes
# the outputs of the last `make book` for every page whose code is unchanged.
STUDENT := _build/student/_build/html
student: setup
	rm -rf $(STUDENT)/reports
	mkdir -p _build/student
	MOBILETL_EDITION=student $(CLASSROOM_ENV) \
	  $(if $(REUSE),MOBILETL_REUSE_EXECUTED=$(CURDIR)/_build/jupyter_execute) \
	  $(JB) build . -W -n --keep-going --all --path-output _build/student 2>&1 | tee _build/student/build.log
	@if [ -d $(STUDENT)/reports ] && [ -n "$$(ls -A $(STUDENT)/reports)" ]; then \
	  echo ">> notebook execution failures, see $(STUDENT)/reports/"; exit 1; \
	fi
	@echo ">> The student edition is at $(CURDIR)/$(STUDENT)/index.html"

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Each assignments/NAME.md becomes _build/assignments/NAME/student (to hand out) and
# NAME/autograder (solutions + the zip that `otter run` or Gradescope grades with).
assignments: python-env
	$(PY) assignments/build.py --out _build/assignments

# The devices' software stacks (mobiletl_edu/deploy/stacks.py, exact locks in deploy/locks/):
# Python 3.6 + torch 1.10.1, and Debian arm64 sysroots run by qemu-aarch64-static with the
# Nano's and the Pi 4's cores. They are built once into $${XDG_CACHE_HOME:-~/.cache}/mobiletl-edu
# (1.9 + 0.5 + 5.0 + 1.0 GB, 1.5 to 6 minutes each) and reused while their locks do not change.
device-test: setup
	@if ! command -v qemu-aarch64-static >/dev/null || ! { command -v debootstrap || [ -x /usr/sbin/debootstrap ]; } >/dev/null; then \
	  $(APT_UPDATE); \
	  $(APT_INSTALL) qemu-user-static debootstrap; \
	fi
	nice $(PY) -m mobiletl_edu.deploy.stacks build
	$(PY) -m pytest tests/test_deploy_device.py -m device $(PYTEST_ARGS)

clean:
	rm -rf _build .jupyter_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(ASSETS) *.egg-info
