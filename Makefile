# Two entry points for a fresh machine: `make demo` and `make test`.
# Both run as the postgres OS user (PostgreSQL refuses root): as root, scripts/as-postgres
# copies the tree to a directory that user owns and re-runs the target there.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test lint demo-inner test-inner bench venv
demo:
	@scripts/as-postgres demo-inner
test:
	@scripts/as-postgres test-inner

# The C page checker (setup.py) lives in the tree as a built .so; scripts/as-postgres's copy drops it,
# so it is rebuilt whenever it does not import and a compiler is there; so is a missing saveit-wal-push.
venv: $(VENV)/.installed
	@{ $(VENV)/bin/python -c 'import saveit_backup.pg._pagecheck' 2>/dev/null && test -x $(VENV)/bin/saveit-wal-push; } || \
	  ! command -v gcc >/dev/null || $(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

demo-inner: venv
	$(VENV)/bin/python -m saveit_backup.demo

test-inner: lint
	$(VENV)/bin/pytest -p no:cacheprovider -q $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/python bench/logical.py
