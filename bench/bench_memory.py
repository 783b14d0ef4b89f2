"""Benchmark: peak memory (RSS) of ``platemask mask`` on large photos, and on one small photo.

    .venv/bin/python bench/bench_memory.py [--images 12] [--megapixels 79] [--cache DIR] [-- extra CLI args]
    .venv/bin/python bench/bench_memory.py --server [--images 4]

Generates one large JPEG (smooth gradients with mild noise: cheap to make, realistic to decode)
once into ``--cache`` (default: a folder in the system temp dir, reused by later runs), links it
``--images`` times into a source folder, runs the real CLI in a subprocess and prints its peak
resident memory (``ru_maxrss`` of the child, so the model, torch and every thread are counted) and
images/s. Then does the same for one small (1280x720) photo, the floor the model and torch set.
``--server`` instead starts the container server (one gunicorn worker), posts ``--images`` large
photos at once and prints the worker's peak RSS (VmHWM) and the slowest /ping meanwhile.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A JPEG of gradients and noise, written once (a 79 MP one takes a few seconds)."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    xs = np.linspace(0, 255, width, dtype=np.float32)
    for y0 in range(0, height, 512):  # in strips: the generator itself stays small
        y1 = min(y0 + 512, height)
        ys = np.linspace(y0, y1 - 1, y1 - y0, dtype=np.float32)[:, None] * (255.0 / height)
        noise = rng.integers(0, 24, (y1 - y0, width), dtype=np.uint8)
        img[y0:y1, :, 0] = (xs[None, :] + noise).astype(np.uint8)
        img[y0:y1, :, 1] = (ys + noise).astype(np.uint8)
        img[y0:y1, :, 2] = ((xs[None, :] + ys) / 2).astype(np.uint8)
    tmp = path.with_suffix(".part.jpg")
    Image.fromarray(img).save(tmp, quality=90)
    tmp.replace(path)


def run_cli(photo: Path, n: int, extra: list[str]) -> tuple[float, float, int]:
    """Mask ``n`` copies of ``photo`` with the CLI in a fresh subprocess: (peak RSS GB, wall s, exit code)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        for i in range(n):
            target = src / f"photo{i:03d}.jpg"
            try:
                os.link(photo, target)
            except OSError:
                shutil.copyfile(photo, target)
        # a fresh interpreter per measurement: RUSAGE_CHILDREN is the max over all waited-for
        # children, so each figure comes from its own process tree
        code = (
            "import resource, subprocess, sys, time\n"
            "t0 = time.perf_counter()\n"
            "rc = subprocess.call(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t0, rc)\n"
        )
        cmd = [sys.executable, "-m", "platemask.cli", "mask", str(src), str(dst), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run([sys.executable, "-c", code, *cmd], env=env, check=True, capture_output=True, text=True)
        rss_kb, wall, rc = out.stdout.split()[-3:]
        if int(rc) != 0:
            print(out.stderr[-3000:], file=sys.stderr)
        return int(rss_kb) / 1024**2, float(wall), int(rc)


def run_server(photo: Path, n: int) -> None:
    """One worker, ``n`` parallel requests of ``photo``: the worker's peak RSS and the slowest /ping."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = ROOT / "models" / "platemask-mnv2-fpn"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAGEMAKER_BIND_TO_PORT": str(port), "PLATEMASK_DEVICE": "cpu",
           "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "100", "PLATEMASK_MODEL_DIR": str(model)}
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def call(path, body=None, timeout=600):
        req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "image/jpeg"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    try:
        for _ in range(600):
            try:
                if call("/ping", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        worker = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        data = photo.read_bytes()
        slowest, t0 = 0.0, time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(call, "/invocations", data) for _ in range(n)]
            while not all(f.done() for f in futures):
                t = time.perf_counter()
                try:
                    call("/ping", timeout=30)
                    slowest = max(slowest, time.perf_counter() - t)
                except OSError:
                    slowest = float("inf")
                time.sleep(0.5)
            statuses = [f.result()[0] for f in futures]
        wall = time.perf_counter() - t0
        hwm = next(line for line in Path(f"/proc/{worker}/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(f"server, {n} parallel requests: statuses {statuses}, worker peak RSS "
              f"{int(hwm.split()[1]) / 1024**2:.2f} GB, {wall:.1f} s, slowest /ping {slowest:.2f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--megapixels", type=float, default=79.0, help="size of the large photos (4:3)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "platemask-bench-memory"),
                    help="where the generated photos are kept between runs")
    ap.add_argument("--skip-small", action="store_true", help="do not measure the one small photo")
    ap.add_argument("--server", action="store_true", help="measure the container server instead of the CLI")
    ap.add_argument("extra", nargs="*", help="extra arguments for 'platemask mask' (after --)")
    a = ap.parse_args()
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    width = int(round((a.megapixels * 1e6 * 4 / 3) ** 0.5 / 16) * 16)
    height = int(round(width * 3 / 4 / 16) * 16)
    big = cache / f"gradient_{width}x{height}.jpg"
    t0 = time.perf_counter()
    make_photo(big, width, height)
    print(f"photo {big.name}: {width}x{height} = {width * height / 1e6:.1f} MP, {big.stat().st_size / 1e6:.1f} MB "
          f"(ready in {time.perf_counter() - t0:.1f} s)")
    if a.server:
        return run_server(big, a.images)
    rss, wall, rc = run_cli(big, a.images, a.extra)
    print(f"{a.images} x {width * height / 1e6:.0f} MP: peak RSS {rss:.2f} GB, {wall:.1f} s wall "
          f"({a.images / wall:.2f} images/s, model load included), exit {rc}")
    if not a.skip_small:
        small = cache / "gradient_1280x720.jpg"
        make_photo(small, 1280, 720, seed=1)
        rss, wall, rc = run_cli(small, 1, a.extra)
        print(f"1 x 1280x720: peak RSS {rss:.2f} GB, {wall:.1f} s wall, exit {rc}")


if __name__ == "__main__":
    main()
