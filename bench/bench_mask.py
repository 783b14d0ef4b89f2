"""Benchmark: end-to-end ``platemask mask`` on generated 1280x720 JPEGs; prints images/s and where time goes.

    .venv/bin/python bench/bench_mask.py [--images 40] [--device cpu|cuda] [--batch-size 4]

Runs the real CLI in a subprocess (model load included in wall time, reported separately), then
prints the report's per-stage milliseconds per image. Stage times overlap (reading, masking and
writing run in threads beside the detector), so they add up to more than the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from platemask.training.synth import synth_car_scene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(a.images):
            img, _, _ = synth_car_scene(rng, n_plates=int(rng.integers(0, 3)), plate_width=(40, 140))
            cv2.imwrite(str(src / f"car{i:04d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        cmd = [sys.executable, "-m", "platemask.cli", "mask", str(src), str(dst), "--report", str(Path(tmp) / "r.json"),
               "--device", a.device, "--batch-size", str(a.batch_size)]
        if a.model:
            cmd += ["--model", a.model]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        r = json.loads((Path(tmp) / "r.json").read_text())
    print(f"images: {a.images} x 1280x720 JPEG, device {a.device}, batch {a.batch_size}, cores {os.cpu_count()}")
    print(f"end to end (masking loop): {r['images_per_second']:.2f} images/s ({r['wall_seconds']:.1f} s)")
    print(f"whole command incl. start-up and model load: {a.images / wall:.2f} images/s ({wall:.1f} s)")
    print("ms per image by stage (threads overlap):")
    for k, v in sorted(r["timings_ms_per_image"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:8s} {v:8.1f}")
    print(f"statuses: {r['by_status']}")


if __name__ == "__main__":
    main()
