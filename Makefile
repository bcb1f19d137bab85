# Two entry points for people (README): `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
CONFIG ?= configs/demo.yaml
# Ray 2.60 reads this at import: token auth on for every cluster these targets start or join.
export RAY_AUTH_MODE ?= token

.PHONY: install demo test lint format clean

# uv installs what pip would (pip's indexes, find-links and constraints, `pip config list`; the
# best version over all indexes, as pip picks), about twice as fast: torch's CUDA wheels unpacked
# in parallel (a clean clone on a busy 2-core box: pip 348 s, uv 181 s with a cold cache,
# pydensecrf2 built; the same 137 packages). It byte-compiles as pip does: with
# PYTHONDONTWRITEBYTECODE set (as on these machines) nothing else would, and every Ray worker process would
# compile torch and Ray from source again (a Ray test: 57 s instead of 36 s).
pip_setting = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$(1)='\(.*\)'$$/\1/p" | tail -n 1)
uv_settings = $(foreach url,$(call pip_setting,extra-index-url),--extra-index-url $(url)) \
	$(foreach dir,$(call pip_setting,find-links),--find-links $(dir)) \
	$(foreach file,$(call pip_setting,constraint),--constraint $(file))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python \
		--index-strategy unsafe-best-match \
		$(uv_settings) -e '.[test,dev,cluster,crf,track,export]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/maskdistill demo --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy maskdistill jobs serve

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
