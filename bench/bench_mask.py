"""Benchmark: ``platemask mask`` on 1280x720 JPEGs; prints model-only time, pipeline time, their
ratio, start-up apart, and the CLI's peak RSS.

    .venv/bin/python bench/bench_mask.py [--images 40] [--photos DIR] [--runtime auto|torch|onnx]
                                         [--device cpu|cuda] [--batch-size 4] [--model DIR] [--rounds 3]

Photos: ``--photos DIR`` takes the first N images found under DIR (e.g.
``../shared/datasets/plates-real-v1/images``) and resizes each to 1280x720; without it, generated
car scenes (crude drawings: out of the model's domain, so their detection counts are not realistic).

1. model only: the Segmenter (detector + verifier, as the CLI builds it) over the decoded photos in
   batches, in a fresh process with the CLI's allocator settings (``platemask.allocator``), after
   one warm-up batch; no reading, decoding, masking or writing.
2. pipeline: the real CLI in a subprocess. Its report's masking-loop wall time is the pipeline time;
   start-up and model load are the rest of the command's wall time, reported apart.
3. overhead = pipeline / model-only - 1 (what reading, decoding, masking, encoding and writing add
   beside the model on these cores). Peak RSS is the CLI process's maximum resident set, with the
   peaks of its two parts (anonymous: the process's own memory; file-backed: mostly the mapped
   pages of torch's, torchvision's and ONNX Runtime's libraries, which a newer kernel maps in
   large folios: ``import torch`` alone was 691 MB resident on a 6.18 kernel, 420 MB of it
   file-backed).

The two are run in turn, ``--rounds`` times (CLI, model, CLI, model, ...), and the medians are
reported with each round's pair: on a shared virtual machine the speed of both drifts by 10-20 %
within minutes, so one model run and one CLI run minutes apart can differ by that much alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from platemask.constants import DEFAULT_RUNTIME, RUNTIMES  # noqa: E402

SIZE = (1280, 720)


def make_photos(src: Path, n: int, photos: str | None) -> None:
    if photos:
        files = sorted(p for p in Path(photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if len(files) < n:
            raise SystemExit(f"--photos {photos}: {len(files)} images found, {n} needed")
        step = max(1, len(files) // n)  # spread over the folder (its sources are grouped)
        for i, f in enumerate(files[::step][:n]):
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if bgr is None:
                raise SystemExit(f"cannot read {f}")
            cv2.imwrite(str(src / f"car{i:04d}.jpg"), cv2.resize(bgr, SIZE, interpolation=cv2.INTER_AREA),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
        return
    from platemask.training.synth import synth_car_scene

    rng = np.random.default_rng(0)
    for i in range(n):
        img, _, _ = synth_car_scene(rng, n_plates=int(rng.integers(0, 3)), plate_width=(40, 140))
        cv2.imwrite(str(src / f"car{i:04d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def load_segmenter(a: argparse.Namespace):
    from platemask.cli import default_model_dir
    from platemask.segment import Segmenter

    return Segmenter(a.model or default_model_dir(), device=a.device, batch_size=a.batch_size, runtime=a.runtime)


def model_only(src: Path, a: argparse.Namespace) -> tuple[float, int, str]:
    """ms per photo for the Segmenter alone, the plates it returned and its runtime, measured in a
    fresh process like the CLI's (a model left loaded here slowed the next CLI run)."""
    cmd = [sys.executable, __file__, "--model-only-of", str(src), "--device", a.device, "--runtime", a.runtime,
           "--batch-size", str(a.batch_size)] + (["--model", a.model] if a.model else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"the model-only run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r["ms"], r["plates"], r["runtime"]


def _model_only_child(src: Path, a: argparse.Namespace) -> None:
    from platemask.allocator import keep_triton_out, return_freed_memory_to_os

    return_freed_memory_to_os()  # the allocator as the CLI sets it: the ratio is then the I/O work's alone
    keep_triton_out()  # and the same libraries loaded
    seg = load_segmenter(a)
    imgs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(src.iterdir())]
    ms, plates = _time_segmenter(seg, imgs, a.batch_size)
    print(json.dumps({"ms": ms, "plates": plates, "runtime": seg.runtime}))


def _time_segmenter(seg, imgs: list[np.ndarray], batch_size: int) -> tuple[float, int]:
    seg(imgs[:batch_size])  # warm-up: first-call allocations and kernel selection
    t0 = time.perf_counter()
    plates = 0
    for i in range(0, len(imgs), batch_size):
        plates += sum(len(p) for p in seg(imgs[i : i + batch_size]))
    return 1000 * (time.perf_counter() - t0) / len(imgs), plates


def _rss_parts(pid: int) -> tuple[int, int]:
    """The process's resident anonymous and file-backed memory now (kB), from /proc (0, 0 elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def run_cli(cmd: list[str], report: Path, dst: Path) -> tuple[float, dict, float, tuple[float, float]]:
    """One CLI run into an empty ``dst``: its whole wall time, its report, its peak RSS (MB) and the
    peaks of its anonymous and file-backed resident memory (MB, sampled every 20 ms: the file-backed
    part is mostly torch's and ONNX Runtime's shared libraries, which the kernel maps in pages or in
    large folios depending on its version, and which other processes share)."""
    import threading

    if dst.exists():
        shutil.rmtree(dst)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, cwd=ROOT)
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            anon, file = _rss_parts(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], anon), max(peaks[1], file)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the CLI failed (exit {proc.returncode}): {' '.join(cmd)}")
    return wall, json.loads(report.read_text()), usage.ru_maxrss / 1024, (peaks[0] / 1024, peaks[1] / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--photos", default=None, help="folder of real photos (resized to 1280x720); default: generated scenes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="CLI and model-only runs, in turn (medians reported)")
    ap.add_argument("--model-only-of", metavar="DIR", help=argparse.SUPPRESS)  # the model-only child process
    a = ap.parse_args()
    if a.model_only_of:
        return _model_only_child(Path(a.model_only_of), a)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        make_photos(src, a.images, a.photos)
        # each round the CLI, then the model alone, each in a fresh process (the CLI's peak RSS is the figure)
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "platemask.cli", "mask", str(src), str(dst), "--report", str(report),
               "--device", a.device, "--batch-size", str(a.batch_size), "--runtime", a.runtime]
        if a.model:
            cmd += ["--model", a.model]
        rounds = []
        for i in range(max(1, a.rounds)):
            wall, r, rss_mb, parts = run_cli(cmd, report, dst)
            model_ms, plates, runtime = model_only(src, a)
            rounds.append((1000 * r["wall_seconds"] / a.images, model_ms, wall - r["wall_seconds"], r, rss_mb, parts))
            print(f"round {i + 1}: pipeline {rounds[-1][0]:6.1f} ms/photo, model only {model_ms:6.1f}, "
                  f"ratio {rounds[-1][0] / model_ms:.2f}", flush=True)
        peak_mb = max(x[4] for x in rounds)
    pipe_ms = statistics.median(x[0] for x in rounds)
    model_ms = statistics.median(x[1] for x in rounds)
    startup = statistics.median(x[2] for x in rounds)
    r = min(rounds, key=lambda x: abs(x[0] - pipe_ms))[3]  # the median run's report
    print(f"photos: {a.images} x {SIZE[0]}x{SIZE[1]} JPEG ({'from ' + a.photos if a.photos else 'generated scenes'}), "
          f"device {a.device}, runtime {runtime}, batch {a.batch_size}, cores {os.cpu_count()}, "
          f"medians of {len(rounds)} rounds")
    print(f"model only (detector + verifier):  {model_ms:7.1f} ms/photo = {1000 / model_ms:.2f} images/s ({plates} plates)")
    print(f"pipeline (platemask mask loop):    {pipe_ms:7.1f} ms/photo = {1000 / pipe_ms:.2f} images/s")
    print(f"pipeline / model only:             {pipe_ms / model_ms:7.2f} (overhead {100 * (pipe_ms / model_ms - 1):+.0f} %); "
          f"per round {min(x[0] / x[1] for x in rounds):.2f}-{max(x[0] / x[1] for x in rounds):.2f}")
    print(f"start-up and model load (apart):   {startup:7.1f} s; whole command "
          f"{a.images / (startup + pipe_ms * a.images / 1000):.2f} images/s")
    print(f"peak RSS of the CLI process:       {peak_mb:7.0f} MB (max of {len(rounds)} runs: "
          f"{', '.join(str(round(x[4])) for x in rounds)}); of it at most {max(x[5][0] for x in rounds):.0f} MB "
          f"anonymous and {max(x[5][1] for x in rounds):.0f} MB file-backed (shared libraries; sampled every 20 ms)")
    print("CLI ms per photo by stage, median run (threads overlap, so these add up to more than the loop):")
    for k, v in sorted(r["timings_ms_per_image"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:12s} {v:8.1f}")
    print(f"statuses: {r['by_status']}")


if __name__ == "__main__":
    main()
