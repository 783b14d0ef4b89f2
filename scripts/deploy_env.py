#!/usr/bin/env python3
"""Secrets of the compose deployment (docker-compose.yaml): generate a local .env, refuse weak values.

    python3 scripts/deploy_env.py generate [--env-file .env]   # `make env`: add missing secrets, keep existing ones
    python3 scripts/deploy_env.py check NAME...                 # in a container: refuse missing/placeholder values
    python3 scripts/deploy_env.py write-passwords FILE          # airflow-init: the admin's password into the
                                                                # SimpleAuthManager password file (on a volume)

The compose file reads every secret as ``${NAME:?...}``, so `docker compose` refuses to start
when one is missing; ``check`` (run by airflow-init and minio-init, which everything else waits
for) also refuses empty, short and well-known placeholder values. Standard library only: it runs
on a laptop with any Python 3 and inside the Airflow image.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _token() -> str:
    return secrets.token_urlsafe(32)  # 43 characters of [A-Za-z0-9_-]: safe in URLs, JSON and .env


def _fernet() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()  # what cryptography's Fernet.generate_key() returns


# name -> (generator, what it is). Access-key names are not secrets but are generated per deployment too.
VARIABLES: dict[str, tuple] = {
    "POSTGRES_PASSWORD": (_token, "password of the airflow user in Postgres (fixed once the volume is initialised)"),
    "REDIS_PASSWORD": (_token, "Redis (Celery broker) password"),
    "AIRFLOW_FERNET_KEY": (_fernet, "Fernet key encrypting connections and variables in the metadata DB"),
    "AIRFLOW_JWT_SECRET": (lambda: secrets.token_urlsafe(64), "signs the api-server's and the Execution API's JWTs"),
    "AIRFLOW_API_SECRET_KEY": (_token, "the api-server's session secret"),
    "AIRFLOW_ADMIN_PASSWORD": (_token, "password of the Airflow user 'admin' (SimpleAuthManager)"),
    "MINIO_ROOT_USER": (lambda: "root-" + secrets.token_hex(6), "MinIO root user: only minio-init and you use it"),
    "MINIO_ROOT_PASSWORD": (_token, "MinIO root password"),
    "PLATEMASK_S3_ACCESS_KEY": (lambda: "airflow-" + secrets.token_hex(6), "MinIO user Airflow logs in with"),
    "PLATEMASK_S3_SECRET_KEY": (_token, "its secret key (policy: the bucket's platemask prefixes only)"),
}
NOT_SECRET = {"MINIO_ROOT_USER", "PLATEMASK_S3_ACCESS_KEY"}
MIN_SECRET_LENGTH = 20
# values seen in quick-starts and earlier versions of this repository
KNOWN_DEFAULTS = {"airflow", "admin", "minioadmin", "minio", "root", "platemask", "platemask-secret", "password",
                  "change-me-platemask-jwt-secret", "change-me-platemask-secret-key"}
PLACEHOLDER_WORDS = ("change", "replace", "example", "placeholder", "password", "secret", "default")


def problem(name: str, value: str | None) -> str | None:
    """Why ``value`` is not acceptable for ``name``, or None when it is."""
    if not value:
        return f"{name} is not set ({VARIABLES[name][1]}); run `make env` to write a .env with random values"
    low = value.lower()
    if low in KNOWN_DEFAULTS:
        return f"{name} is a well-known default ({value!r}); run `make env` or set a random value"
    if name in NOT_SECRET:
        return None
    if any(w in low for w in PLACEHOLDER_WORDS):
        return f"{name} looks like a placeholder (it contains one of {PLACEHOLDER_WORDS}); set a random value"
    if len(value) < MIN_SECRET_LENGTH:
        return f"{name} is {len(value)} characters long; use at least {MIN_SECRET_LENGTH} random characters"
    if name == "AIRFLOW_FERNET_KEY":
        try:
            ok = len(base64.urlsafe_b64decode(value.encode())) == 32
        except ValueError:
            ok = False
        if not ok:
            return f"{name} is not a Fernet key (32 url-safe base64-encoded bytes); run `make env`"
    return None


def generate_value(name: str) -> str:
    while True:  # a random value that happens to contain e.g. "change" is drawn again
        value = VARIABLES[name][0]()
        if problem(name, value) is None:
            return value


def read_env(path: Path) -> dict[str, str]:
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("export "):  # compose's .env reads `export NAME=value` lines too
                line = line[len("export "):].strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                values[k.strip()] = v.strip().strip('"').strip("'")
    return values


def generate(path: Path) -> list[str]:
    """Add every missing variable to ``path`` (created 0600); existing values are kept. Returns the names added."""
    existing = read_env(path)
    added = [n for n in VARIABLES if not existing.get(n)]
    if added:
        lines = [] if not path.exists() else [path.read_text().rstrip("\n")]
        if not path.exists():
            lines.append("# Secrets of the local compose deployment, written by `make env` (scripts/deploy_env.py).\n"
                         "# Never commit this file (.gitignore has it). Keep it: the Postgres password and the\n"
                         "# Fernet key must stay the same once the volumes are initialised.")
        lines += [f"{n}={generate_value(n)}" for n in added]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return added


def check(names: list[str], env: dict[str, str]) -> list[str]:
    unknown = [n for n in names if n not in VARIABLES]
    if unknown:
        raise SystemExit(f"unknown variable(s) {unknown}; known: {sorted(VARIABLES)}")
    out = [p for n in names if (p := problem(n, env.get(n)))]
    # one value in two roles (the JWT secret pasted as the session secret, the admin's password as
    # Postgres'): whoever learns it through one role holds the other too
    seen: dict[str, str] = {}
    for n in names:
        value = env.get(n)
        if not value:
            continue
        if value in seen:
            out.append(f"{n} has the same value as {seen[value]}: every secret must be its own random value "
                       f"(a leak of one would give the other); delete {n} from .env and run `make env` to draw a new one")
        else:
            seen[value] = n
    return out


def write_passwords(path: Path, users: dict[str, str]) -> None:
    """Merge ``users`` into the SimpleAuthManager password file (other users' generated passwords stay)."""
    current = {}
    if path.is_file() and path.read_text().strip():
        current = json.loads(path.read_text())
    current.update(users)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(current) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write missing secrets to the .env file (existing ones are kept)")
    g.add_argument("--env-file", type=Path, default=ROOT / ".env")
    c = sub.add_parser("check", help="refuse missing, short or placeholder values (from the environment)")
    c.add_argument("names", nargs="+")
    w = sub.add_parser("write-passwords", help="put AIRFLOW_ADMIN_PASSWORD into the SimpleAuthManager password file")
    w.add_argument("file", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        added = generate(args.env_file)
        print(f"{args.env_file}: " + (f"added {', '.join(added)}" if added else "complete, nothing changed"))
        bad = check(list(VARIABLES), read_env(args.env_file))
        for p in bad:
            print("refused: " + p, file=sys.stderr)
        return 1 if bad else 0
    if args.cmd == "check":
        bad = check(args.names, dict(os.environ))
        for p in bad:
            print("refusing to start: " + p, file=sys.stderr)
        return 1 if bad else 0
    bad = check(["AIRFLOW_ADMIN_PASSWORD"], dict(os.environ))
    if bad:
        print("refusing to start: " + bad[0], file=sys.stderr)
        return 1
    write_passwords(args.file, {"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]})
    print(f"{args.file}: password of 'admin' set from AIRFLOW_ADMIN_PASSWORD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
