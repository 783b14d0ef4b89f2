"""`make container-test`: build the real inference image and exercise it the way SageMaker runs it.

Steps (each prints what it does and how long it took):
  1. a Docker engine: uses a running one; otherwise (as root) installs Debian's ``docker.io`` when
     ``dockerd`` is missing and starts ``dockerd`` in the background (left running for reuse).
  2. the base image: the Dockerfile's default ``BASE_IMAGE`` when present or pullable; otherwise a
     local Debian bookworm base (``debootstrap`` + ``docker import``, tagged ``platemask-base:bookworm``,
     reused on later runs) with python3/pip/venv and this machine's extra CA certificates, so pip
     inside the build can reach PyPI through a TLS-inspecting proxy. That base never leaves the machine.
  3. ``docker build --network host`` of ``containers/inference/Dockerfile`` (kept for reuse: a
     second run is served from Docker's layer cache). Torch comes from the Dockerfile's
     ``TORCH_INDEX_URL`` (a CUDA 12.x build) when that index is reachable, else from PyPI (a CUDA 13
     build: the same server, not the production torch build; the run says so).
  4. ``platemask package-model`` → model.tar.gz, unpacked as SageMaker does, mounted read-only at
     ``/opt/ml/model``; ``docker run --network host ... IMAGE serve`` on a free port
     (``SAGEMAKER_BIND_TO_PORT``); /ping must turn 200 within SageMaker's 4 minutes.
  5. ``pytest tests/test_container.py`` against it (``PLATEMASK_CONTAINER_URL``/``_NAME``), then
     throughput (images/s), memory (``docker stats``), image size, build and start-up times.

Exit status: 0 passed (or skipped: no Docker engine can be had here, the reason is printed;
``--require-docker`` makes that a failure), 1 a step or a test failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "containers" / "inference" / "Dockerfile"
MODEL_DIR = ROOT / "models" / "platemask-mnv2-fpn"
LOCAL_BASE = "platemask-base:bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
SAGEMAKER_PING_LIMIT_S = 240  # SageMaker gives a container 4 minutes to answer /ping
CONTAINER_CA = "/etc/ssl/certs/ca-certificates.crt"  # Debian/Ubuntu bundle path inside the build
PYPI_INDEX = "https://pypi.org/simple"


class Skip(Exception):
    """No Docker engine can be had on this machine: the test is skipped, with this reason."""


def log(msg: str) -> None:
    print(f"[container-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = False, timeout: float | None = None,
        **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, text=True, capture_output=capture, timeout=timeout, **kw)
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout or "")[-2000:] if capture else "(output above)"
        raise RuntimeError(f"`{' '.join(cmd)}` exited {res.returncode}: {detail}")
    return res


def docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return run(["docker", "info"], check=False, capture=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def dockerfile_arg(name: str) -> str:
    """The default of ``ARG name=...`` in the Dockerfile (one home for the fact)."""
    m = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.M)
    if not m:
        raise RuntimeError(f"{DOCKERFILE} has no `ARG {name}=<default>` line")
    return m.group(1)


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except urllib.error.HTTPError:
        return True  # something answered
    except (urllib.error.URLError, OSError):
        return False


def torch_build_args(given: list[str]) -> list[str]:
    """The Dockerfile's torch index (a CUDA 12.x build) when reachable, else PyPI's torch (CUDA 13)."""
    if any(g.startswith("TORCH_INDEX_URL=") for g in given):
        return []
    index = dockerfile_arg("TORCH_INDEX_URL")
    if reachable(index.rstrip("/") + "/torch/"):
        return []
    log(f"{index} is unreachable here: building with PyPI's torch (a CUDA 13 build, TORCH_CUDA=13.); the "
        "server contract is the same, but the image tested is not the production torch build")
    return ["--build-arg", f"TORCH_INDEX_URL={PYPI_INDEX}", "--build-arg", "TORCH_CUDA=13."]


def ensure_engine(wait_s: float, log_path: Path) -> None:
    if docker_ok():
        return
    if os.geteuid() != 0:
        raise Skip("no Docker engine answers `docker info` and this user is not root, so none can be started")
    if shutil.which("dockerd") is None:
        if shutil.which("apt-get") is None:
            raise Skip("no Docker engine, no dockerd and no apt-get to install Debian's docker.io")
        log("installing Debian's docker.io (dockerd) ...")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        t0 = time.monotonic()
        try:
            run(["apt-get", "update", "-q"], capture=True, env=env, timeout=300)
            run(["apt-get", "install", "-y", "-q", "docker.io"], capture=True, env=env, timeout=600)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            raise Skip(f"could not install docker.io: {exc}") from exc
        log(f"docker.io installed in {time.monotonic() - t0:.0f} s")
    log(f"starting dockerd in the background (log: {log_path})")
    with open(log_path, "ab") as out:
        subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if docker_ok():
            log("Docker engine is up")
            return
        time.sleep(1)
    tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
    raise Skip(f"dockerd did not answer `docker info` within {wait_s:.0f} s; its log ends:\n{tail}")


def image_exists(ref: str) -> bool:
    return run(["docker", "image", "inspect", ref], check=False, capture=True).returncode == 0


def make_local_base() -> None:
    """Debian bookworm minbase with python3/pip/venv + this machine's extra CAs, as a local image."""
    if shutil.which("debootstrap") is None:
        log("installing debootstrap ...")
        run(["apt-get", "install", "-y", "-q", "debootstrap"], capture=True,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=300)
    with tempfile.TemporaryDirectory(prefix="platemask-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap --variant=minbase bookworm (+{DEBIAN_PACKAGES}) ...")
        t0 = time.monotonic()
        run(["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", str(rootfs),
             "http://deb.debian.org/debian"], capture=True, timeout=1200)
        extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for crt in extra:  # a TLS-inspecting proxy's CA: pip in the build needs it; never in a pushed image
            shutil.copy(crt, rootfs / "usr/local/share/ca-certificates" / crt.name)
        if extra:
            run(["chroot", str(rootfs), "update-ca-certificates"], capture=True)
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / d).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "-c", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "-", LOCAL_BASE], stdin=tar.stdout, capture=True)
        tar.wait()
        log(f"made {LOCAL_BASE} in {time.monotonic() - t0:.0f} s ({len(extra)} extra CA certificate(s))")


def ensure_base(requested: str | None) -> str:
    base = requested or dockerfile_arg("BASE_IMAGE")
    if image_exists(base):
        return base
    log(f"pulling {base} ...")
    try:
        pulled = run(["docker", "pull", base], check=False, capture=True, timeout=900).returncode == 0
    except subprocess.TimeoutExpired:
        pulled = False
    if pulled:
        return base
    if requested:
        raise RuntimeError(f"base image {base} is neither present nor pullable")
    log(f"{base} cannot be pulled here (no registry reachable): using the local Debian base {LOCAL_BASE}")
    if not image_exists(LOCAL_BASE):
        make_local_base()
    return LOCAL_BASE


def build(image: str, base: str, build_args: list[str]) -> float:
    cmd = ["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
           "--build-arg", f"PIP_CERT={CONTAINER_CA}", *torch_build_args(build_args)]
    for b in build_args:
        cmd += ["--build-arg", b]
    cmd += ["-f", str(DOCKERFILE), "-t", image, str(ROOT)]
    log("$ " + " ".join(cmd))
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        out.seek(0)
        text = out.read()
    if res.returncode != 0:
        raise RuntimeError(f"docker build failed (exit {res.returncode}); its output ends:\n{text[-4000:]}")
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def unpack_model(tmp: Path) -> Path:
    """``platemask package-model``, then unpacked as SageMaker unpacks model.tar.gz into /opt/ml/model."""
    tgz = tmp / "model.tar.gz"
    run([sys.executable, "-m", "platemask.cli", "package-model", str(tgz), "--model", str(MODEL_DIR)],
        capture=True, cwd=ROOT)
    out = tmp / "model"
    with tarfile.open(tgz) as tar:
        # the "data" filter (no links out, no absolute paths) exists from Python 3.11.4 on
        tar.extractall(out, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for p in [out, *out.rglob("*")]:  # world-readable, as SageMaker's /opt/ml/model is for the container's user
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp.chmod(0o755)
    return out


def start(image: str, name: str, port: int, model: Path, env: list[str]) -> tuple[float, list[int | None]]:
    cmd = ["docker", "run", "-d", "--name", name, "--network", "host",
           "-e", f"SAGEMAKER_BIND_TO_PORT={port}", "-v", f"{model}:/opt/ml/model:ro"]
    gpu = shutil.which("nvidia-smi") and run(["nvidia-smi"], check=False, capture=True).returncode == 0
    cmd += ["--gpus", "all"] if gpu else ["-e", "PLATEMASK_DEVICE=cpu", "-e", "PLATEMASK_REQUIRE_CUDA=0"]
    for e in env:
        cmd += ["-e", e]
    cmd += [image, "serve"]
    log("$ " + " ".join(cmd))
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    run(cmd, capture=True)
    seen: list[int | None] = []
    while time.monotonic() - t0 < SAGEMAKER_PING_LIMIT_S:
        status = ping(url)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 200:
            return time.monotonic() - t0, seen
        state = run(["docker", "inspect", "-f", "{{.State.Status}}", name], capture=True).stdout.strip()
        if state != "running":
            break
        time.sleep(0.1)
    logs = run(["docker", "logs", "--tail", "60", name], check=False, capture=True)
    raise RuntimeError(f"/ping not 200 within {SAGEMAKER_PING_LIMIT_S} s (statuses seen: {seen}); "
                       f"container log ends:\n{logs.stdout}{logs.stderr}")


def memory(name: str) -> str:
    return run(["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", name], capture=True).stdout.strip()


def throughput(url: str, n: int) -> tuple[float, int]:
    """images/s of /invocations for n generated 1280x720 car photos, MaxConcurrentTransforms at once."""
    import io

    import numpy as np
    from PIL import Image

    from platemask.training.synth import synth_car_scene

    rng = np.random.default_rng(11)
    bodies = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(synth_car_scene(rng, n_plates=1)[0]).save(buf, format="JPEG", quality=92)
        bodies.append(buf.getvalue())
    with urllib.request.urlopen(url + "/execution-parameters", timeout=10) as r:
        conc = int(json.loads(r.read())["MaxConcurrentTransforms"])

    def post(body: bytes) -> int:
        req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status

    post(bodies[0])  # warm-up (first request pays lazy initialisation)
    t0 = time.monotonic()
    with ThreadPoolExecutor(conc) as pool:
        statuses = list(pool.map(post, bodies))
    if statuses != [200] * n:
        raise RuntimeError(f"throughput run: statuses {statuses}")
    return n / (time.monotonic() - t0), conc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", default="platemask-inference:test", help="tag of the image built and tested")
    p.add_argument("--base", help="BASE_IMAGE build argument (default: the Dockerfile's, else a local Debian base)")
    p.add_argument("--no-build", action="store_true", help="test an already built --image")
    p.add_argument("--engine-wait", type=float, default=90, help="seconds to wait for a started dockerd")
    p.add_argument("--require-docker", action="store_true", help="fail (not skip) when no Docker engine can be had")
    p.add_argument("--images", type=int, default=16, help="photos for the throughput measurement")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", dest="build_args",
                   help="extra docker build argument (e.g. TORCH_INDEX_URL=..., TORCH_CUDA=...)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra container environment")
    p.add_argument("--keep", action="store_true", help="leave the container running after the tests")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = p.parse_args(argv)
    # CI's `timeout` sends SIGTERM: unwind so the container is removed (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_all = time.monotonic()
    try:
        ensure_engine(a.engine_wait, Path(tempfile.gettempdir()) / "platemask-dockerd.log")
    except Skip as exc:
        print(f"container-test SKIPPED: {exc}", flush=True)
        return 1 if a.require_docker else 0
    numbers: dict[str, object] = {}
    name = f"platemask-ct-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="platemask-ct-"))
    try:
        if not a.no_build:
            base = ensure_base(a.base)
            numbers["base image"] = base
            numbers["build s"] = round(build(a.image, base, a.build_args), 1)
            log(f"built {a.image} in {numbers['build s']} s")
            run(["docker", "image", "prune", "-f"], capture=True)  # dangling layers of earlier builds
        size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", a.image], capture=True).stdout)
        numbers["image GB"] = round(size / 1e9, 2)
        model = unpack_model(tmp)
        port = free_port()
        cold, seen = start(a.image, name, port, model, a.env)
        url = f"http://127.0.0.1:{port}"
        numbers["cold start to /ping 200 s"] = round(cold, 1)
        numbers["/ping statuses seen"] = seen
        numbers["memory after load"] = memory(name)
        log(f"{url} healthy after {cold:.1f} s (statuses {seen})")
        env = dict(os.environ, PLATEMASK_CONTAINER_URL=url, PLATEMASK_CONTAINER_NAME=name,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        t0 = time.monotonic()
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_container.py", *a.pytest_args],
                               cwd=ROOT, env=env)
        numbers["contract tests s"] = round(time.monotonic() - t0, 1)
        if tests.returncode != 0:
            raise RuntimeError(f"contract tests failed (pytest exit {tests.returncode})")
        ips, conc = throughput(url, a.images)
        numbers[f"images/s ({a.images} photos 1280x720, {conc} at once)"] = round(ips, 2)
        numbers["memory after throughput"] = memory(name)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"container-test FAILED: {exc}", flush=True)
        return 1
    finally:
        if not a.keep:
            run(["docker", "rm", "-f", name], check=False, capture=True)
        shutil.rmtree(tmp, ignore_errors=True)
        numbers["total s"] = round(time.monotonic() - t_all, 1)
        print("container-test numbers:\n" + "\n".join(f"  {k}: {v}" for k, v in numbers.items()), flush=True)
    print("container-test PASSED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
