"""docker-compose.yaml cannot run here (no Docker engine): check its wiring by reading it."""
import json

import yaml

from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def _env(name):
    env = SERVICES[name].get("environment", {})
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_all_services_present():
    assert {"postgres", "redis", "minio", "minio-init", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"} <= set(SERVICES)


def test_celery_queues_and_gpu_reservation():
    assert "--queues default" in SERVICES["airflow-worker"]["command"]
    gpu = SERVICES["airflow-worker-gpu"]
    assert "--queues gpu" in gpu["command"] and "--concurrency 1" in gpu["command"]
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert _env("airflow-worker-gpu")["PLATEMASK_DEVICE"] == "cuda"
    env = _env("airflow-scheduler")
    assert env["PLATEMASK_QUEUE"] == "gpu" and env["PLATEMASK_POOL"] == "platemask_gpu"
    assert "airflow pools set platemask_gpu 1" in SERVICES["airflow-init"]["command"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "@redis:" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert "@postgres/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


def test_mounts_and_connection_to_minio():
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker", "airflow-worker-gpu"):
        vols = SERVICES[name]["volumes"]
        targets = {v.split(":")[1] for v in vols}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/models"} <= targets, name
        env = _env(name)
        conn = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
        assert conn["conn_type"] == "aws" and conn["extra"]["endpoint_url"] == "http://minio:9000"
        assert conn["login"] == _env("minio")["MINIO_ROOT_USER"]
        assert env["PLATEMASK_MODEL_DIR"].startswith("/opt/airflow/models/")
        assert (ROOT / "models" / env["PLATEMASK_MODEL_DIR"].split("/opt/airflow/models/")[1] / "config.json").is_file()
    assert f"local/{_env('airflow-scheduler')['PLATEMASK_BUCKET']}" in SERVICES["minio-init"]["entrypoint"]


def test_start_order():
    dep = SERVICES["airflow-scheduler"]["depends_on"]
    assert dep["airflow-init"]["condition"] == "service_completed_successfully"
    assert dep["postgres"]["condition"] == "service_healthy"
    assert dep["minio-init"]["condition"] == "service_completed_successfully"
    assert (ROOT / SERVICES["airflow-scheduler"]["build"]["dockerfile"]).is_file()
