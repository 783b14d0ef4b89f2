# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
.PHONY: setup demo test bench evaluate
VENV := .venv/bin

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/python -m platemask.demo

test: setup
	$(VENV)/python -m pytest -q

bench: setup
	$(VENV)/python bench/bench_mask.py

evaluate: setup
	$(VENV)/platemask evaluate --data ../shared/datasets/plates-real-v1 --out evaluation.json
