"""Benchmark: the DAG with backend=local vs backend=sagemaker (local transform runner), same photos.

    .venv/bin/python bench/bench_backends.py [--photos 24]

Everything on this machine: moto's S3/SageMaker on 127.0.0.1, the container server (gunicorn,
2 workers) started once, Airflow's dag.test() on SQLite. Prints each run's wall time, the mask
step's images/s and the SageMaker path's overhead (transform + reading .out files).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=24)
    a = ap.parse_args()
    home = tempfile.mkdtemp(prefix="pm-bench-airflow-")
    os.environ.update({"AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                       "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "PLATEMASK_DEADLINE_HOURS": "0",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import logging

    import boto3
    import numpy as np
    from moto.server import ThreadedMotoServer

    from platemask.demo import _free_port
    from platemask.local_transform import wait_ready
    from platemask.training.synth import synth_car_scene

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port(9150)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    ep = f"http://127.0.0.1:{port}"
    os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps({"conn_type": "aws", "login": "bench", "password": "bench",
                                                         "extra": {"endpoint_url": ep, "region_name": "us-east-1"}})
    sport = _free_port(9151)
    server = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(sport),
                                                                  SAGEMAKER_MODEL_SERVER_WORKERS="2",
                                                                  PLATEMASK_MODEL_DIR=str(ROOT / "models" / "platemask-mnv2-fpn")))
    os.environ.update({"PLATEMASK_SAGEMAKER_IMAGE_URI": "123456789012.dkr.ecr.us-east-1.amazonaws.com/platemask:bench",
                       "PLATEMASK_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/platemask",
                       "PLATEMASK_SAGEMAKER_LOCAL_ENDPOINT": f"http://127.0.0.1:{sport}"})
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    s3 = boto3.client("s3", endpoint_url=ep)
    rng = np.random.default_rng(0)
    import cv2

    photos = {}
    for i in range(a.photos):
        img, _, _ = synth_car_scene(rng, n_plates=int(rng.integers(0, 3)), plate_width=(40, 150))
        photos[f"raw/DE/2026/11/20/insp{i:03d}/p.jpg"] = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
    wait_ready(f"http://127.0.0.1:{sport}")
    import importlib.util

    results = {}
    for backend in ("local", "sagemaker"):
        bucket = f"bench-{backend}"
        s3.create_bucket(Bucket=bucket)
        for k, v in photos.items():
            s3.put_object(Bucket=bucket, Key=k, Body=v)
        os.environ["PLATEMASK_BUCKET"] = bucket
        spec = importlib.util.spec_from_file_location(f"pm_{backend}", ROOT / "dags" / "plate_masking.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        t0 = time.perf_counter()
        dr = mod.plate_masking_dag.test(logical_date=datetime(2026, 11, 21, 1, tzinfo=timezone.utc),
                                        run_conf={"region": "DE", "backend": backend})
        wall = time.perf_counter() - t0
        rep = json.loads(s3.get_object(Bucket=bucket, Key="qa/DE/20261119T2300Z-20261120T2300Z/report.json")["Body"].read())
        results[backend] = (dr.state, wall, rep)
    server.terminate()
    srv.stop()
    print(f"\n{a.photos} generated 1280x720 photos, {os.cpu_count()} cores, CPU")
    for backend, (state, wall, rep) in results.items():
        print(f"backend={backend:9s} run {state}: {wall:6.1f} s wall (dag.test, model loads included); "
              f"mask step {rep['mask_images_per_second']} images/s; {rep['by_status']}")
    overhead = results["sagemaker"][1] - results["local"][1]
    print(f"SageMaker path overhead vs local: {overhead:+.1f} s ({overhead / a.photos * 1000:+.0f} ms/photo); "
          "the transform itself runs in the container before the mask step, which then only masks")


if __name__ == "__main__":
    main()
