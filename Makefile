# The commands of the README: `make demo` (the main job on the embedded default), `make airflow-ui` and `make test`.
.PHONY: setup browser demo airflow-ui test container-test bench evaluate env
VENV := .venv/bin

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/python -m platemask.demo

airflow-ui: setup
	$(VENV)/python -m platemask.demo --ui

# a Chromium for the browser tests, when none is installed (as root with apt-get; they skip otherwise)
browser:
	./scripts/browser.sh

test: setup browser
	$(VENV)/python -m pytest -q

# builds containers/inference/Dockerfile, runs it as SageMaker does and runs tests/test_container.py
# against it; starts a Docker engine when none runs (as root), skips with the reason when it cannot
container-test: setup
	$(VENV)/python scripts/container_test.py

bench: setup
	$(VENV)/python bench/bench_mask.py
	$(VENV)/python bench/bench_serve.py
	$(VENV)/python bench/bench_backends.py

evaluate: setup
	$(VENV)/platemask evaluate --data ../shared/datasets/plates-real-v1 --data ../shared/datasets/negatives-interior-v1 --out evaluation.json

# the compose deployment's secrets: writes .env (git-ignored, 0600) with random values; existing values are kept
env:
	python3 scripts/deploy_env.py generate
