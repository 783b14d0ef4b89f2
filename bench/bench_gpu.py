"""GPU benchmark: detector (+ verifier) throughput at 1280x720 by batch size, fp16 on CUDA.

    .venv/bin/python bench/bench_gpu.py [--images 256] [--batch-sizes 1,4,8,16,32] [--model DIR] [--photos DIR]

Runs unchanged on a GPU machine (``--device cuda`` is the default when CUDA is available) and on
CPU (for comparison; use small ``--images``). Prints, per batch size: model-only images/s (the
Segmenter on decoded photos: views, detector, masks to polygons, verifier), then the end-to-end CLI
figure at the best batch size (decode, detect, mask, encode, write; start-up reported apart) with
the CLI's own per-stage times, and the GPU's name and peak memory. At the best batch size it also
splits the model-only time into the network (synchronised), the outlines of its masks (``_plates``,
on the CPU), the merge across views and the verifier, so one run on a lent machine says where the
time goes. ``--photos DIR`` uses real photos (resized to 1280x720, as ``bench_mask.py`` does)
instead of generated scenes. Nothing here is timed in tests.
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from platemask.constants import resolve_device  # noqa: E402
from platemask.segment import Segmenter  # noqa: E402
from platemask.training.synth import synth_car_scene  # noqa: E402


def photos(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, _, _ = synth_car_scene(rng, n_plates=int(rng.integers(0, 3)), plate_width=(40, 140))
        out.append(cv2.resize(img, (1280, 720)) if img.shape[:2] != (720, 1280) else img)
    return out


def split_times(seg: Segmenter, imgs: list[np.ndarray], bs: int, cuda: bool) -> dict[str, float]:
    """ms per photo in the network, the outlines, and the verifier, at batch size ``bs``."""
    spent = {"network": 0.0, "outlines (_plates)": 0.0, "verifier": 0.0}

    def timed(name, fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                spent[name] += time.perf_counter() - t
        return run

    seg.model.forward = timed("network", seg.model.forward)
    seg._plates = timed("outlines (_plates)", seg._plates)
    seg.verify_many = timed("verifier", seg.verify_many)
    t0 = time.perf_counter()
    for i in range(0, len(imgs), bs):
        seg(imgs[i : i + bs])
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    # _plates runs inside the network's caller, not inside forward: the parts do not overlap
    spent["rest (views, tensors, merge)"] = total - sum(spent.values())
    return {k: 1000 * v / len(imgs) for k, v in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,4,8,16,32")
    ap.add_argument("--device", default=resolve_device("auto"))
    ap.add_argument("--model", default=str(ROOT / "models" / "platemask-mnv2-fpn"))
    ap.add_argument("--photos", help="real photos (resized to 1280x720) instead of generated scenes")
    ap.add_argument("--no-cli", action="store_true", help="skip the end-to-end CLI run")
    ap.add_argument("--cli-io", default="", help="comma-separated --io-workers values to run the CLI with "
                                                "(default: the CLI's own default only)")
    ap.add_argument("--cli-run", action="append", default=[], metavar="K=V,...",
                    help="one end-to-end CLI run per option, e.g. bs=128,io=8,budget=2048,switch=0.5,cv2=1 (batch "
                         "size, --io-workers, --pixel-budget-mb, the interpreter's switch interval in ms, OpenCV's "
                         "threads); overrides --cli-io")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N operators that take the most host time (torch.profiler, one batch)")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run with --device cpu for a CPU comparison)")
        return
    if a.photos:
        from bench_mask import make_photos  # bench/ is this script's folder, first on sys.path

        with tempfile.TemporaryDirectory() as tmp:
            make_photos(Path(tmp), a.images, a.photos)
            imgs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(Path(tmp).iterdir())]
    else:
        imgs = photos(a.images)
    gpu = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    print(f"device {a.device} ({gpu}), torch {torch.__version__}, {a.images} photos of 1280x720")
    best = (0.0, 1)
    for bs in [int(x) for x in a.batch_sizes.split(",")]:
        seg = Segmenter(a.model, device=a.device, batch_size=bs)
        seg(imgs[:bs])  # warm-up: cuDNN autotuning, allocator
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(0, len(imgs), bs):
            seg(imgs[i : i + bs])
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rate = len(imgs) / dt
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if a.device.startswith("cuda") else ""
        print(f"batch {bs:3d}: model-only {rate:8.1f} images/s ({1000 * dt / len(imgs):.1f} ms/image){mem}")
        best = max(best, (rate, bs))
    seg = Segmenter(a.model, device=a.device, batch_size=best[1])
    seg(imgs[: best[1]])
    parts = split_times(seg, imgs, best[1], a.device.startswith("cuda"))
    print(f"where the model-only time goes at batch {best[1]} (ms/photo; synchronised around each part, so the "
          f"total, {sum(parts.values()):.1f}, is above the model-only figure): "
          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
        seg = Segmenter(a.model, device=a.device, batch_size=best[1])  # unpatched: split_times added syncs
        seg(imgs[: best[1]])
        with profile(activities=acts) as prof:
            seg(imgs[: best[1]])
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile, max_name_column_width=60))
    del seg
    if a.no_cli:
        return
    runs = [dict(kv.split("=", 1) for kv in spec.split(",")) for spec in a.cli_run] or \
        [{"io": io} if io else {} for io in a.cli_io.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for i, img in enumerate(imgs):
            cv2.imwrite(str(src / f"car{i:04d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        for n, run in enumerate(runs):
            unknown = set(run) - {"bs", "io", "budget", "switch", "cv2"}
            if unknown:
                raise SystemExit(f"--cli-run: unknown keys {sorted(unknown)} (bs, io, budget, switch, cv2)")
            bs = int(run.get("bs", best[1]))
            dst, report = Path(tmp) / f"dst{n}", Path(tmp) / f"r{n}.json"
            # switch: the interpreter's switch interval in ms while the job runs (the job's own next to a
            # GPU is platemask.pipeline.GPU_SWITCH_INTERVAL_MS; Python's default is 5)
            # cv2: OpenCV's threads per call (cv2.setNumThreads; its default is one per core)
            pre = "import sys; "
            pre += (f"import platemask.pipeline as P; P.GPU_SWITCH_INTERVAL_MS = {float(run['switch'])!r}; "
                    if "switch" in run else "")
            pre += f"import cv2; cv2.setNumThreads({int(run['cv2'])}); " if "cv2" in run else ""
            cmd = [sys.executable, "-c", pre + "from platemask.cli import main; sys.exit(main())",
                   "mask", str(src), str(dst), "--report", str(report),
                   "--device", a.device, "--batch-size", str(bs), "--model", a.model]
            cmd += ["--io-workers", run["io"]] if run.get("io") else []
            cmd += ["--pixel-budget-mb", run["budget"]] if run.get("budget") else []
            t0 = time.perf_counter()
            done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            if done.returncode not in (0, 1) or not report.exists():  # 1: some photo failed (the report says)
                print(f"CLI run {run} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
                continue
            r = json.loads(report.read_text())
            label = ", ".join(f"{k} {v}" for k, v in {"batch": bs, **{k: v for k, v in run.items() if k != "bs"}}.items())
            print(f"end to end (CLI, {label}): {r['images_per_second']:.1f} "
                  f"images/s in the masking loop; {len(imgs) / wall:.1f} images/s for the whole command "
                  f"({wall - r['wall_seconds']:.1f} s start-up)")
            print("CLI ms per photo by stage (threads overlap): "
                  + ", ".join(f"{k} {v}" for k, v in sorted(r["timings_ms_per_image"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
