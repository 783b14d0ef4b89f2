"""The demo's entry points, run as a user runs them: `make demo` shows progress and the run's summary
(Airflow's logs go to a file it names), `make airflow-ui` starts from a fresh clone without an
activated virtualenv, and the seeded truncated upload stays within the default failure limit."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from platemask.demo import PHOTOS, TRUNCATED_KEY, standalone_env, truncated_note
from platemask.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bare_path() -> str:
    """PATH as in a fresh shell: without this interpreter's (the virtualenv's) bin folder."""
    keep = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if p and Path(p).resolve() != VENV_BIN.resolve()]
    return os.pathsep.join(keep or ["/usr/bin", "/bin"])


def _demo_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": _bare_path(), **extra}


def test_airflow_standalone_finds_airflow_without_an_activated_venv():
    env = standalone_env({"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    found = shutil.which("airflow", path=env["PATH"])
    assert found and Path(found).parent == VENV_BIN
    # what `airflow standalone` does to start its components: spawn `airflow` by name
    out = subprocess.run(["airflow", "version"], env={**os.environ, **env, "PATH": env["PATH"]}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().startswith("3.")


def test_the_seeded_truncated_upload_is_within_the_default_failure_limit():
    limit = Settings.max_failure_rate
    assert 1 / (PHOTOS + 1) <= limit  # the demo window: PHOTOS generated + the truncated upload
    assert "within the default max_failure_rate of 2%" in truncated_note(PHOTOS + 1)
    # fewer photos: the note says the default run fails by design, and how to get a green one
    note = truncated_note(25)
    assert "above the default max_failure_rate of 2%" in note and TRUNCATED_KEY in note
    assert "set max_failure_rate to 0.04" in note and "--photos 49" in note


def test_make_demo_prints_a_short_summary_and_names_the_airflow_log(tmp_path):
    """`make demo` with the defaults: a green run whose console output is progress + summary, while
    Airflow's (and the tasks') logs go to the file the summary names."""
    demo = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "platemask.demo", "--dir", str(demo), "--s3-port", str(_free_port())],
                         env=_demo_env(), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    console = (out.stdout + out.stderr).splitlines()
    log = demo / "airflow.log"
    assert out.returncode == 0, "\n".join(console[-40:]) + "\n" + (log.read_text()[-5000:] if log.exists() else "")
    assert len(console) <= 60, "\n".join(console)
    text = "\n".join(console)
    assert not re.search(r"\[(info|warning|debug) *\]|\[DAG TEST\]", text), text  # no Airflow log lines
    assert re.search(r"^=== plate_masking \S+ -> success in [\d.]+ s ===$", text, re.M), text
    assert f"failed (truncated): {TRUNCATED_KEY} — never published" in text
    assert f"Airflow log (task logs included): {log}" in text
    assert "check finished" in text  # a progress line per finished task
    # the log holds what the console no longer shows: the DAG test run, its tasks and their logs
    logged = log.read_text()
    assert "[DAG TEST] end task task_id=process.mask" in logged and "[DAG TEST] end task task_id=check" in logged
    assert re.search(r"Marking run <DagRun plate_masking .*> successful", logged)
    assert "=== plate_masking" not in logged  # the summary is the console's
    # the run used the nightly defaults: the truncated upload is a failed record within the default limit
    report = json.loads(next((demo / "output" / "qa" / "DE").glob("*/report.json")).read_text())
    assert report["max_failure_rate"] == Settings.max_failure_rate
    assert report["by_status"]["failed"] == 1 and report["failure_rate"] <= report["max_failure_rate"]
    assert [i["key"] for i in report["failures_by_reason"]["truncated"]["items"]] == [TRUNCATED_KEY]
    masked = {p.relative_to(demo / "output" / "masked").as_posix() for p in (demo / "output" / "masked").rglob("*.*")}
    assert len(masked) == report["images"] - 1 and TRUNCATED_KEY.replace("raw/", "", 1) not in masked


def _health(port: int):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=3) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _descendants(pid: int) -> set[int]:
    """Live (not zombie) processes below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.add(pid)
    return live


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_make_airflow_ui_starts_without_an_activated_venv(tmp_path, stop):
    """`python -m platemask.demo --ui` (what `make airflow-ui` runs) with PATH as in a fresh shell:
    the API server answers its health endpoint with every component healthy, and Ctrl-C in the
    terminal (SIGINT to the group) or a ``kill`` of the demo (SIGTERM to it alone: a supervisor, a CI
    timeout) stops it all. SIGTERM's default action had ended the demo at once and left `airflow
    standalone`, in a process group of its own, running."""
    try:
        port = _free_port()
    except OSError as e:
        pytest.skip(f"cannot bind a local port in this sandbox: {e}")
    demo = tmp_path / "demo"
    env = _demo_env(AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),  # other Airflows may hold the defaults
                    AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(_free_port()))
    assert shutil.which("airflow", path=env["PATH"]) is None or Path(shutil.which("airflow", path=env["PATH"])).parent != VENV_BIN
    console = tmp_path / "console.txt"
    with open(console, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "platemask.demo", "--ui", "--dir", str(demo), "--port", str(port),
                                 "--s3-port", str(_free_port())], env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True,  # its own process group: stopped as a terminal's Ctrl-C does
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        log_file = demo / "airflow.log"
        while proc.poll() is None and "Airflow is ready at" not in console.read_text() and time.monotonic() < deadline:
            if log_file.exists() and "FileNotFoundError" in log_file.read_text(errors="replace"):
                break  # a component could not be started (e.g. `airflow` not on PATH): no use waiting
            time.sleep(2)
        shown = console.read_text()
        log = (demo / "airflow.log").read_text(errors="replace") if (demo / "airflow.log").exists() else ""
        assert "Airflow is ready at" in shown, shown + "\n--- log tail ---\n" + log[-6000:]
        health = _health(port)
        assert health and all(health[c]["status"] == "healthy" for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")), health
        assert f"http://localhost:{port}" in shown and "within the default max_failure_rate of 2%" in shown
        assert "FileNotFoundError" not in log
        assert len(shown.splitlines()) <= 12, shown  # standalone's own output goes to the log
        assert "api-server |" in log and "scheduler  |" in log
        started = _descendants(proc.pid)  # standalone and its components
        assert len(started) >= 5, started
        t0 = time.monotonic()
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        else:
            os.kill(proc.pid, signal.SIGTERM)  # `kill PID`: the demo alone
        rc = proc.wait(timeout=200)
        stopped = console.read_text()
        assert not _alive(started), f"left running after {stop}: " + ", ".join(
            Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") for p in _alive(started))
        assert _health(port) is None
        # standalone stops its components itself (within a minute), or the demo ends them and says so
        assert (rc, stopped.splitlines()[-1]) == (0, "stopped") or (
            rc == 1 and "did not stop within a minute of" in stopped and "its processes were ended" in stopped), (rc, stopped)
        assert ("SIGTERM: stopping" if stop == "sigterm" else "Ctrl-C: stopping") in stopped, stopped
        print(f"stopped in {time.monotonic() - t0:.1f} s, exit code {rc}")
    finally:
        leftovers = _alive(started | _descendants(proc.pid))
        for pid in leftovers:  # only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
