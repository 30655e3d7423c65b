# Both targets create or reuse .venv on their own (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export DEFINEMED_CACHE ?= $(CURDIR)/.cache/definemed
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test bootstrap bench clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m definemed.cli pipeline --config configs/demo.yaml

test: bootstrap
	$(PY) -m pytest -q --durations=25 tests

bench: bootstrap
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf outputs .cache
