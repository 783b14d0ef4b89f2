# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
.PHONY: setup demo airflow-ui test bench evaluate env
VENV := .venv/bin

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/python -m platemask.demo

airflow-ui: setup
	$(VENV)/python -m platemask.demo --ui

test: setup
	$(VENV)/python -m pytest -q

bench: setup
	$(VENV)/python bench/bench_mask.py
	$(VENV)/python bench/bench_serve.py
	$(VENV)/python bench/bench_backends.py

evaluate: setup
	$(VENV)/platemask evaluate --data ../shared/datasets/plates-real-v1 --out evaluation.json

# the compose deployment's secrets: writes .env (git-ignored, 0600) with random values; existing values are kept
env:
	python3 scripts/deploy_env.py generate
