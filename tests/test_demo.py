"""The demo's entry points work from a fresh clone without an activated virtualenv."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from platemask.demo import standalone_env


def test_airflow_standalone_finds_airflow_without_an_activated_venv():
    env = standalone_env({"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    found = shutil.which("airflow", path=env["PATH"])
    assert found and Path(found).parent == Path(sys.executable).parent
    # what `airflow standalone` does to start its components: spawn `airflow` by name
    out = subprocess.run(["airflow", "version"], env={**os.environ, **env, "PATH": env["PATH"]}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().startswith("3.")
