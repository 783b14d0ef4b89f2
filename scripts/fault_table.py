#!/usr/bin/env python3
"""Run the fault-injection suite (tests/test_faults.py) and print its table of outcomes.

    .venv/bin/python scripts/fault_table.py [-k EXPR]

Each scenario is one nightly run against moto's S3 server behind a fault-injecting proxy (see
tests/test_faults.py); its row says how the run ended and what happened to its photos:

    run state  the run's final state (Airflow's, from dag.test)
    inputs     photos in the run's manifest(s)
    records    detection records the run wrote (must equal inputs: one per photo)
    published  photos whose masked copy is out, with an audit record that describes its bytes
    failed     photos with a failed record (never published)
    lost       inputs without exactly one record + masked copies without a matching audit record
    events     regions the run emitted masked/qa Asset events for

A row is only printed for a scenario whose invariants all held (the test asserts them); failed
scenarios are listed under the table. Exit status: pytest's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [("scenario", "scenario"), ("state", "run state"), ("inputs", "inputs"), ("records", "records"),
           ("published", "published"), ("failed", "failed"), ("lost", "lost"), ("events", "Asset events"),
           ("note", "note")]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("scenario", "state", "events", "note") else "---:" for k, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", help="only the scenarios pytest's -k expression selects")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="platemask-faults-") as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, PLATEMASK_FAULT_TABLE=str(out),
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
               "tests/test_faults.py", "-rf"] + (["-k", args.k] if args.k else [])
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rows = json.loads(out.read_text()) if out.is_file() else []
    print(table(rows))
    summary = [line for line in proc.stdout.splitlines() if line.startswith("FAILED") or " passed" in line
               or " failed" in line]
    print("\n" + "\n".join(summary))
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
