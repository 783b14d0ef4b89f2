"""Measure the lag from a region's window close to its run starting, with a real scheduler.

    .venv/bin/python bench/bench_schedule_lag.py [--minutes 4]

Nightly windows close at local midnight, which a benchmark cannot wait for; so this runs, under
`airflow standalone` (scheduler, DAG processor, triggerer, API server, LocalExecutor, SQLite) in a
throw-away AIRFLOW_HOME, one probe DAG per configured region built with the same
``schedules.nightly_timetable`` (CronDataIntervalTimetable in the region's zone), only with a
per-minute cron, and one trivial task. For each run it reads from the metadata DB: window close
(data_interval_end) -> queued_at -> the first task's start. Prints median and max per region (each
probe's first run is left out: it is created while the components are still starting).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE = textwrap.dedent('''
    import pendulum
    from airflow.sdk import dag, task

    from platemask import schedules
    from platemask.settings import Settings

    SETTINGS = Settings.load()
    for region in SETTINGS.regions:
        @dag(dag_id=f"lag_{region.lower()}", schedule=schedules.nightly_timetable(SETTINGS, region, cron="* * * * *"),
             start_date=pendulum.now("UTC").subtract(minutes=2), catchup=False, max_active_runs=4)
        def probe():
            @task
            def started():
                return None

            started()

        globals()[f"lag_{region.lower()}"] = probe()
''')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0, help="how long the scheduler runs (default 4)")
    ap.add_argument("--report", metavar="AIRFLOW_HOME", help="only print the table of an earlier measurement")
    a = ap.parse_args()
    if a.report:
        report(Path(a.report))
        return
    home = Path(tempfile.mkdtemp(prefix="pm-lag-airflow-"))
    dags = home / "dags"
    dags.mkdir()
    (dags / "lag_probe.py").write_text(PROBE)
    env = dict(os.environ, AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(dags), AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
               AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True", PYTHONPATH=str(ROOT),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=env)
    log = open(home / "standalone.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(a.minutes * 60)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    report(home)


def report(home: Path) -> None:
    import sqlite3

    db = sqlite3.connect(home / "airflow.db")
    rows = db.execute("""
        select r.dag_id, r.data_interval_end, r.queued_at, min(t.start_date)
        from dag_run r left join task_instance t on t.dag_id = r.dag_id and t.run_id = r.run_id
        where r.run_type = 'scheduled' group by r.id order by r.dag_id, r.data_interval_end""").fetchall()
    from datetime import datetime

    def ts(s):
        return datetime.fromisoformat(s) if s else None

    per: dict[str, dict[str, list[float]]] = {}
    for dag_id, end, queued, started in rows:
        if dag_id not in per:  # its first run was created while the components were still starting: left out
            per[dag_id] = {"queued": [], "started": []}
            continue
        d = per[dag_id]
        if queued:
            d["queued"].append((ts(queued) - ts(end)).total_seconds())
        if started:
            d["started"].append((ts(started) - ts(end)).total_seconds())
    print(f"{'probe DAG':<10} {'runs':>4}  {'close->queued median/max s':>27}  {'close->task start median/max s':>31}")
    for dag_id, d in sorted(per.items()):
        q, s = d["queued"], d["started"]
        fmt = (lambda v: f"{statistics.median(v):6.1f} / {max(v):6.1f}" if v else "     - /      -")
        print(f"{dag_id:<10} {len(q):>4}  {fmt(q):>27}  {fmt(s):>31}")
    print(f"(each probe's first run, created during start-up, left out; Airflow home {home}, "
          "its standalone log is standalone.log there)")


if __name__ == "__main__":
    main()
