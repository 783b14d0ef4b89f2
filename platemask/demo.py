"""The main job on an embedded default, on one machine.

    python -m platemask.demo          # seed an embedded S3, run the nightly DAG for one window, print QA
    python -m platemask.demo --ui     # the same S3 and DAGs behind `airflow standalone` (http://localhost:8080)

The S3-compatible server is moto's, on 127.0.0.1. Real photos cannot be shipped, so the demo
generates inspection photos itself (cars with rendered plates, some tilted or small, some with
none, one truncated upload, one EXIF-rotated, one PNG). The console shows progress and the run's
summary; Airflow's own log (task logs included) goes to ``.demo/airflow.log``, which the summary
names. Results are copied to ``.demo/output/``.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from datetime import date, datetime, timezone
from pathlib import Path

from .html_text import visible
from .settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
BUCKET = "inspection-photos"
REGION = "DE"
DAY = "2026/11/20"  # the demo window: DE's 2026-11-20 (Berlin time)
NIGHT = datetime(2026, 11, 21, 1, tzinfo=timezone.utc)  # the nightly run that covers it
TRUNCATED_KEY = f"raw/{REGION}/{DAY}/inspection-2000/photo-1.jpg"
# Generated photos in the window besides the truncated upload: enough that the one truncated photo
# stays within the default failure limit (1 of 55 = 1.8 % <= 2 %), so a run with the defaults ends
# green and still shows that photo as a failed record, never published.
PHOTOS = 54
LOG_NAME = "airflow.log"


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _env(demo: Path, endpoint: str, *, deadline: bool) -> dict:
    env = {
        "AIRFLOW_HOME": str(demo / "airflow"),
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


def standalone_env(base, port: int = 8080) -> dict:
    """Environment for `airflow standalone`: it starts its components as `airflow ...` by name, so
    this interpreter's bin folder goes first on PATH (works without an activated virtualenv). The
    API server listens on ``port``; workers reach its execution API through the base URL."""
    env = dict(base, AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
               AIRFLOW__API__PORT=str(port), AIRFLOW__API__BASE_URL=f"http://localhost:{port}")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def truncated_note(photos_in_window: int, limit: float = Settings.max_failure_rate) -> str:
    """What the seeded truncated upload does to a run with the default failure limit, in words."""
    rate = 1 / photos_in_window
    head = (f"the window holds one deliberately truncated upload ({TRUNCATED_KEY}): 1 of its "
            f"{photos_in_window} photos = {rate:.1%}, ")
    if rate <= limit:
        return head + (f"within the default max_failure_rate of {limit:.0%}: the run ends green and its QA "
                       "report lists that photo as failed (truncated), never published")
    return head + (f"above the default max_failure_rate of {limit:.0%}: a run with the defaults masks the "
                   f"rest, then fails its QA check naming that photo; set max_failure_rate to {rate:.2f} "
                   "or more to see a green run"
                   + (f", or seed more photos (--photos {math.ceil(1 / limit) - 1})" if limit > 0 else ""))


def seed(client, n: int = PHOTOS) -> dict:
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
        key = f"raw/{REGION}/{DAY}/inspection-{1000 + i}/photo-{i % 2 + 1}.jpg"
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
    put(TRUNCATED_KEY, b"\xff\xd8\xff\xe0 upload cut short")
    for day in ("19", "21"):
        img, _, _ = synth_car_scene(rng)
        put(f"raw/{REGION}/2026/11/{day}/inspection-3000/photo-1.jpg", jpeg(img))
    img, _, _ = synth_car_scene(rng)
    put(f"raw/PL/{DAY}/inspection-4000/photo-1.jpg", jpeg(img))
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


@contextmanager
def _logs_to(path: Path):
    """Send everything written to this process's stdout and stderr (Airflow's and the tasks' logs,
    warnings, subprocesses) to ``path``; yield a function that prints a line on the real console."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    saved = os.dup(1), os.dup(2)
    path.write_text("")  # this run's log only
    with open(path, "a") as log:  # append mode: every writer (this process, subprocesses) adds at the end
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield lambda *parts, **kw: print(*parts, **kw, file=console, flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        console.close()


_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(\S+) map_index=(-?\d+)")


def _count(client, prefix: str) -> int | None:
    """Objects under ``prefix``; None when S3 could not be listed (progress only: never fatal)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return sum(page.get("KeyCount", 0) for page in
                   client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix))
    except (BotoCoreError, ClientError):
        return None


def _progress(log: Path, say, stop: threading.Event, t0: float, count_records=None, every_s: float = 30) -> None:
    """Follow the log and print one console line per finished task; every ``every_s`` seconds, the
    photos with an audit record so far (``count_records()``), when that number changed."""
    shown, next_count = 0, time.perf_counter() + every_s
    with open(log, errors="replace") as f:
        while True:
            line = f.readline()
            if not line:
                if stop.is_set():
                    return
                if count_records and time.perf_counter() >= next_count:
                    next_count = time.perf_counter() + every_s
                    n = count_records()
                    if n is not None and n != shown:
                        shown = n
                        say(f"  {time.perf_counter() - t0:6.1f} s  {n} photos masked or recorded so far")
                time.sleep(0.2)
                continue
            m = _TASK_END.search(line)
            if m:
                task = m.group(1) + (f"[{m.group(2)}]" if m.group(2) != "-1" else "")
                say(f"  {time.perf_counter() - t0:6.1f} s  {task} finished")


def _health(port: int) -> dict | None:
    """The API server's health report, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=3) as r:
            return json.loads(r.read())
    except (OSError, ValueError):  # URLError and connection errors are OSErrors
        return None


def _healthy(report: dict | None) -> bool:
    return bool(report) and all(v.get("status") == "healthy" for v in report.values()
                                if isinstance(v, dict) and "status" in v)


def _ui(a, log: Path, say, endpoint: str, photos_in_window: int) -> int:
    port = _free_port(a.port)
    url = f"http://localhost:{port}"
    say(f"starting `airflow standalone` on {url} (no login: all users are admins in this demo); log: {log}")
    say(truncated_note(photos_in_window))
    # Its output (and its components') goes where this process's goes: the log. It runs in its own
    # process group: a terminal's Ctrl-C hitting every component at once left standalone's shutdown
    # hanging (over a minute, components left running); this process forwards Ctrl-C to standalone
    # alone, which stops its components (seconds), and ends whatever is left in the group.
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=standalone_env(os.environ, port),
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        report = None
        while proc.poll() is None and not _healthy(report := _health(port)):
            if time.monotonic() - t0 > a.ready_timeout:
                say(f"not healthy after {a.ready_timeout:.0f} s (health: {report}); still starting, see {log}")
                break
            time.sleep(1)
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            say(f"`airflow standalone` exited with code {proc.returncode} before it was ready; the end of {log}:",
                *tail, sep="\n")
            return proc.returncode or 1
        if _healthy(report):
            from .schedules import backfill_command

            say(f"Airflow is ready at {url} ({time.monotonic() - t0:.0f} s): trigger plate_masking with region "
                f"{REGION}, window start 2026-11-20, window end 2026-11-21, or unpause {REGION}'s nightly DAG and "
                f"backfill its local day 2026-11-20:\n  {backfill_command(REGION, date(2026, 11, 20), date(2026, 11, 20))}\n"
                f"the embedded S3 keeps running here ({endpoint}); Ctrl-C stops both.")
        return proc.wait()
    except KeyboardInterrupt as e:
        _ignore_stop_signals()  # a second Ctrl-C or SIGTERM must not cut the stopping short
        what = e.args[0] if isinstance(e, Stop) else "Ctrl-C"
        say(f"{what}: stopping `airflow standalone` ...")
        if _stop_group(proc):
            say("stopped")
            return 0
        say(f"`airflow standalone` did not stop within a minute of {what}; its processes were ended (see {log})")
        return 1
    finally:
        _stop_group(proc)  # however this ends (an error, standalone gone): leave nothing of it running


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stop(KeyboardInterrupt):
    """SIGTERM (``kill``, a supervisor, a CI runner's timeout) or SIGHUP (the terminal closed): stop as
    on Ctrl-C. Their default action ends this process at once, without its clean-up, and `airflow
    standalone` runs in a process group of its own, so it was left running with the embedded S3 gone."""


def _raise_stop(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


def _stop_group(proc: subprocess.Popen, grace_s: float = 60) -> bool:
    """Stop a process started in its own group and everything in that group: Ctrl-C to the process
    (standalone then stops its components), then SIGTERM and SIGKILL to the group for whatever is
    left (e.g. a component that did not exit in time). True when the process exited within ``grace_s``."""
    graceful = True
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # standalone stops its components (SIGTERM to each)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            graceful = False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # only the group's leftovers, if any
        except ProcessLookupError:
            break
        time.sleep(3)
    proc.wait()
    return graceful


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m platemask.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ui", action="store_true", help="start `airflow standalone` with the DAGs and the embedded S3")
    ap.add_argument("--photos", type=int, default=PHOTOS,
                    help=f"generated photos in the demo window, besides the truncated upload (default {PHOTOS})")
    ap.add_argument("--s3-port", type=int, default=9100)
    ap.add_argument("--port", type=int, default=8080, help="the Airflow UI's port with --ui (another if taken)")
    ap.add_argument("--ready-timeout", type=float, default=300, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=DEMO,
                    help="the demo's folder: Airflow home, airflow.log and output/ (default .demo/)")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    demo = a.dir.resolve()
    demo.mkdir(parents=True, exist_ok=True)
    log = demo / LOG_NAME
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stop)
    with _logs_to(log) as say:
        try:
            return _run(a, demo, log, say, t_start)
        except KeyboardInterrupt as e:
            say(f"interrupted ({e.args[0] if isinstance(e, Stop) else 'Ctrl-C'}); the full log: {log}")
            return 130
        except BaseException as e:
            say(f"the demo stopped: {type(e).__name__}: {e}\nthe full log (Airflow's and the tasks'): {log}")
            raise


def _run(a, demo: Path, log: Path, say, t_start: float) -> int:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = _free_port(a.s3_port)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _env(demo, endpoint, deadline=a.ui)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        counts = seed(client, a.photos)
        say(f"embedded S3 at {endpoint}: bucket {BUCKET} seeded with "
            + ", ".join(f"{v} under {k}" for k, v in sorted(counts.items())))
        say(f"preparing the Airflow database in {demo / 'airflow'} ...")
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, env=os.environ)
        in_window = counts[f"raw/{REGION}/{DAY}/"]
        if a.ui:
            return _ui(a, log, say, endpoint, in_window)
        return _nightly(client, demo, log, say, t_start, in_window)
    finally:
        server.stop()


def _nightly(client, demo: Path, log: Path, say, t_start: float, in_window: int) -> int:
    import importlib.util

    from .qa import headline

    spec = importlib.util.spec_from_file_location("plate_masking_demo", ROOT / "dags" / "plate_masking.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conf = {"region": REGION}  # everything else as the nightly run has it (failure limit included)
    say(truncated_note(in_window))
    say(f"running the nightly DAG run of {NIGHT.isoformat()} (window: {REGION}'s 2026-11-20) with conf {conf};\n"
        f"Airflow's log and the task logs go to {log}")
    t0 = time.perf_counter()
    stop = threading.Event()
    import boto3

    audit = Settings.load().audit_root.format(region=REGION)  # one audit record per photo, as it is done
    counter = boto3.client("s3", endpoint_url=client.meta.endpoint_url)  # one client per thread
    follower = threading.Thread(target=_progress, daemon=True,
                                args=(log, say, stop, t0, lambda: _count(counter, audit)))
    follower.start()
    try:
        dr = mod.plate_masking_dag.test(logical_date=NIGHT, run_conf=conf)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        stop.set()
        follower.join(timeout=5)
    dag_s = time.perf_counter() - t0
    out = demo / "output"
    shutil.rmtree(out, ignore_errors=True)  # this run's results only
    n_masked = _download(client, f"masked/{REGION}/", out)
    _download(client, f"qa/{REGION}/", out)
    reports = sorted(out.glob(f"qa/{REGION}/*/report.json"))
    if not reports:
        say(f"DAG run {dr.state}: no QA report was written; see {log}")
        return 1
    rep = json.loads(reports[-1].read_text())
    say(f"\n=== plate_masking {dr.run_id} -> {dr.state} in {dag_s:.1f} s ===")
    say("window:", rep["window"]["start"], "..", rep["window"]["end"], f"({rep['window']['id']})",
        f"+ {rep.get('late', 0)} late photo(s) from earlier days" if rep.get("late") else "")
    say(f"QA: {headline(rep)}; failure rate {rep['failure_rate']:.1%} (limit {rep['max_failure_rate']:.0%})")
    for reason, info in rep["failures_by_reason"].items():
        for item in info["items"]:
            say(f"  failed ({reason}): {visible(item['key'])} — never published")
        if info["count"] > len(info["items"]):
            say(f"  failed ({reason}): ... and {info['count'] - len(info['items'])} more, each named by its audit record")
    for item in rep["review"]["items"][:10]:
        say(f"  review: {item['key']} ({item['why']})")
    if rep["review"]["count"] > 10:
        say(f"  ... {rep['review']['count'] - 10} more for review in the QA report")
    say(f"mask tasks: {rep.get('mask_images_per_second')} images/s; stage ms/image: {rep.get('timings_ms_per_image')}")
    say(f"masked images ({n_masked}): {out / 'masked' / REGION}")
    say(f"QA report: {reports[-1].parent / 'report.html'} (and report.json)")
    say(f"Airflow log (task logs included): {log}")
    say(f"demo wall time: {time.perf_counter() - t_start:.1f} s")
    return 0 if dr.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
