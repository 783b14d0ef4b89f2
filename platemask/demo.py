"""The main job on an embedded default, on one machine.

    python -m platemask.demo          # seed an embedded S3, run the nightly DAG for one window, print QA
    python -m platemask.demo --ui     # the same S3 and DAGs behind `airflow standalone` (http://localhost:8080)

The S3-compatible server is moto's, on 127.0.0.1. Real photos cannot be shipped, so the demo
generates inspection photos itself (cars with rendered plates, some tilted or small, some with
none, one corrupt file, one EXIF-rotated, one PNG). Results are copied to ``.demo/output/``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
BUCKET = "inspection-photos"
REGION = "DE"
NIGHT = datetime(2026, 11, 21, 1, tzinfo=timezone.utc)  # the nightly run that covers 2026-11-20 (Berlin)


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _env(endpoint: str, *, deadline: bool) -> dict:
    env = {
        "AIRFLOW_HOME": str(DEMO / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "demo", "password": "demo-secret",
                                                "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}),
        "PLATEMASK_BUCKET": BUCKET,
        "PLATEMASK_DEADLINE_HOURS": "6" if deadline else "0",
        "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret", "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    return env


def standalone_env(base) -> dict:
    """Environment for `airflow standalone`: it starts its components as `airflow ...` by name, so
    this interpreter's bin folder goes first on PATH (works without an activated virtualenv)."""
    env = dict(base, AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def seed(client, n: int = 24) -> dict:
    """Generated photos for the demo window, its neighbours and another region."""
    import numpy as np
    from PIL import Image

    from .training.synth import synth_car_scene

    client.create_bucket(Bucket=BUCKET)
    rng = np.random.default_rng(2026)
    counts = {}

    def put(key, data):
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
        partition = "/".join(key.split("/")[:5]) + "/"
        counts[partition] = counts.get(partition, 0) + 1

    def jpeg(img, **kw):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90, **kw)
        return buf.getvalue()

    for i in range(n):
        n_plates = int(rng.choice([0, 1, 1, 1, 2]))
        img, _, _ = synth_car_scene(rng, n_plates=n_plates, plate_width=(45, 170))
        key = f"raw/{REGION}/2026/11/20/inspection-{1000 + i}/photo-{i % 2 + 1}.jpg"
        if i == 3:  # a phone photo stored sideways with an EXIF orientation flag
            exif = Image.Exif()
            exif[0x0112] = 6
            put(key, jpeg(np.ascontiguousarray(np.rot90(img, 1)), exif=exif.tobytes()))
        elif i == 5:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            put(key.replace(".jpg", ".png"), buf.getvalue())
        else:
            put(key, jpeg(img))
    put(f"raw/{REGION}/2026/11/20/inspection-2000/photo-1.jpg", b"\xff\xd8\xff\xe0 upload cut short")
    for day in ("19", "21"):
        img, _, _ = synth_car_scene(rng)
        put(f"raw/{REGION}/2026/11/{day}/inspection-3000/photo-1.jpg", jpeg(img))
    img, _, _ = synth_car_scene(rng)
    put("raw/PL/2026/11/20/inspection-4000/photo-1.jpg", jpeg(img))
    return counts


def _download(client, prefix: str, dest: Path) -> int:
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            p = dest / o["Key"]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read())
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m platemask.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ui", action="store_true", help="start `airflow standalone` with the DAGs and the embedded S3")
    ap.add_argument("--photos", type=int, default=24, help="generated photos in the demo window")
    ap.add_argument("--s3-port", type=int, default=9100)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    DEMO.mkdir(exist_ok=True)
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = _free_port(a.s3_port)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    _env(endpoint, deadline=a.ui)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    counts = seed(client, a.photos)
    print(f"embedded S3 at {endpoint}: bucket {BUCKET} seeded with " + ", ".join(f"{v} under {k}" for k, v in sorted(counts.items())))
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ)
    if a.ui:
        from .schedules import backfill_command

        print("starting `airflow standalone` on http://localhost:8080 (no login: all users are admins in this demo);\n"
              "trigger plate_masking with region DE and window 2026-11-20 .. 2026-11-21, or unpause and backfill\n"
              "plate_masking_de (DE's nightly DAG; the backfill below runs DE's local day 2026-11-20):\n"
              "(the window holds one deliberately truncated upload: 1 of 25 photos = 4 %, above the default\n"
              " max_failure_rate of 2 %, so a run with the defaults fails its QA check by design and names the\n"
              " photo; set max_failure_rate to 0.05 in the trigger form to see a green run)\n"
              f"  {backfill_command(REGION, date(2026, 11, 20), date(2026, 11, 20))} "
              "--dag-run-conf '{\"max_failure_rate\": 0.05}'\n"
              f"the embedded S3 keeps running here ({endpoint}); Ctrl-C stops both.")
        env2 = standalone_env(os.environ)
        try:
            return subprocess.call([sys.executable, "-m", "airflow", "standalone"], env=env2)
        finally:
            server.stop()

    import importlib.util

    spec = importlib.util.spec_from_file_location("plate_masking_demo", ROOT / "dags" / "plate_masking.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conf = {"region": REGION, "max_failure_rate": 0.05}
    print(f"running the nightly DAG run of {NIGHT.isoformat()} (window: {REGION}'s 2026-11-20) with conf {conf} ...")
    t0 = time.perf_counter()
    dr = mod.plate_masking_dag.test(logical_date=NIGHT, run_conf=conf)
    dag_s = time.perf_counter() - t0
    out = DEMO / "output"
    n_masked = _download(client, f"masked/{REGION}/", out)
    _download(client, f"qa/{REGION}/", out)
    reports = sorted(out.glob(f"qa/{REGION}/*/report.json"))
    if not reports:
        print(f"DAG run {dr.state}: no QA report was written; see the log above", file=sys.stderr)
        server.stop()
        return 1
    rep = json.loads(reports[-1].read_text())
    from .qa import headline

    print("\n=== plate_masking", dr.run_id, "->", dr.state, f"in {dag_s:.1f} s ===")
    print("window:", rep["window"]["start"], "..", rep["window"]["end"], f"({rep['window']['id']})")
    print("QA:", headline(rep))
    for reason, info in rep["failures_by_reason"].items():
        for item in info["items"]:
            print(f"  failed ({reason}): {item['key']} — never published")
    for item in rep["review"]["items"][:10]:
        print(f"  review: {item['key']} ({item['why']})")
    print(f"mask tasks: {rep.get('mask_images_per_second')} images/s; stage ms/image: {rep.get('timings_ms_per_image')}")
    print(f"masked images ({n_masked}): {out / 'masked' / REGION}")
    print(f"QA report: {reports[-1].parent / 'report.html'} (and report.json)")
    print(f"demo wall time: {time.perf_counter() - t_start:.1f} s")
    server.stop()
    return 0 if dr.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
