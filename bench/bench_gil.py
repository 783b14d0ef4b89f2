"""Benchmark: how much a Python-busy thread slows the job's decoding and encoding threads (the GIL).

    .venv/bin/python bench/bench_gil.py [--seconds 2] [--switch-ms 5,1,0.5,0.1]

Every decode, mask and encode lets go of the interpreter lock while C code runs and must take it
back after; while another thread runs Python (the detector's own Python: torchvision's per-photo
proposal and NMS loops, the polygons), taking it back waits up to the switch interval. This prints,
for 1280x720 JPEGs, each step's rate alone and beside a thread that runs Python all the time, at
several switch intervals, and the same through a worker process fed by a pipe (what a process
pool does with a decoded photo: 2.7 MB in 64 KB reads, each a wait). Why a GPU job's reading and
writing threads stay far below their CPU speed (README, GPU rows). Nothing here is timed in tests.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from platemask.detections import Plate  # noqa: E402
from platemask.imageio import decode, encode  # noqa: E402
from platemask.mask import MaskStyle, apply_mask  # noqa: E402

PLATE = np.array([[500, 400], [640, 400], [640, 440], [500, 440]], np.float32)


def photos(n: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8), (0, 0), 3)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def decode_photo(data: bytes):
    return decode(data)


def mask_and_encode(dec) -> bytes:
    return encode(dec, apply_mask(dec.pixels, [Plate(score=0.9, polygon=PLATE)], MaskStyle(), copy=False))


def python_loop(seconds: float) -> int:
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            n += 1
    return n


def rate_beside_python(step, seconds: float) -> tuple[float, float]:
    """(steps/s in a thread while the main thread runs Python, the Python loop's share of its speed alone)."""
    alone = python_loop(seconds / 2) * 2
    stop, count = threading.Event(), [0]

    def work():
        n = 0
        while not stop.is_set():
            step(n)
            n += 1
        count[0] = n

    t = threading.Thread(target=work)
    t.start()
    loop = python_loop(seconds)
    stop.set()
    t.join()
    return count[0] / seconds, loop / max(alone, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--switch-ms", default="5,1,0.5,0.1")
    a = ap.parse_args()
    datas = photos()
    decs = [decode(d) for d in datas]
    steps = {"decode (Pillow)": lambda n: decode_photo(datas[n % len(datas)]),
             "mask + encode": lambda n: mask_and_encode(decs[n % len(decs)])}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for n in range(len(datas)):
            step(n)
        print(f"{name}: alone {len(datas) / (time.perf_counter() - t0):.0f}/s")
    default = sys.getswitchinterval()
    for ms in [float(x) for x in a.switch_ms.split(",")]:
        sys.setswitchinterval(ms / 1000)
        for name, step in steps.items():
            r, loop = rate_beside_python(step, a.seconds)
            print(f"switch interval {ms:g} ms: {name} {r:.0f}/s beside a Python thread (which runs at {loop:.2f} of its speed alone)")
    sys.setswitchinterval(default)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        pool.submit(decode_photo, datas[0]).result()
        r, _ = rate_beside_python(lambda n: pool.submit(decode_photo, datas[n % len(datas)]).result(), a.seconds)
        print(f"switch interval {default * 1000:g} ms: decode in a worker process, the photo back through its pipe: "
              f"{r:.0f}/s beside a Python thread")


if __name__ == "__main__":
    main()
