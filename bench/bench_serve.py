"""Benchmark: the inference container's server on this machine, as Batch Transform drives it.

    .venv/bin/python bench/bench_serve.py [--images 40] [--workers 1] [--concurrency 2]

Starts ``python -m platemask.serve serve`` (gunicorn, the container's entry point) on 127.0.0.1,
waits for /ping, then POSTs generated 1280x720 JPEGs to /invocations with the given concurrency
(SageMaker's MaxConcurrentTransforms) and prints images/s and latency percentiles.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from platemask.local_transform import _http, wait_ready  # noqa: E402
from platemask.training.synth import synth_car_scene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1, help="SAGEMAKER_MODEL_SERVER_WORKERS")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--model", default=str(ROOT / "models" / "platemask-mnv2-fpn"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(a.images):
        img, _, _ = synth_car_scene(rng, n_plates=int(rng.integers(0, 3)), plate_width=(40, 140))
        bodies.append(cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS=str(a.workers),
               PLATEMASK_MODEL_DIR=a.model)
    t_start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        ready = time.perf_counter() - t_start
        lat = []

        def post(body):
            t0 = time.perf_counter()
            status, _ = _http("POST", url + "/invocations", body, {"Content-Type": "application/x-image"}, timeout=300)
            lat.append(time.perf_counter() - t0)
            return status

        post(bodies[0])  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as pool:
            statuses = list(pool.map(post, bodies))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"server: {a.workers} worker(s), concurrency {a.concurrency}, {os.cpu_count()} cores; ready after {ready:.1f} s")
    print(f"{a.images} x 1280x720 JPEG: {a.images / wall:.2f} images/s; latency p50 {np.median(lat) * 1000:.0f} ms, "
          f"p95 {np.percentile(lat, 95) * 1000:.0f} ms; statuses {sorted(set(statuses))}")


if __name__ == "__main__":
    main()
