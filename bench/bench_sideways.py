"""Photos lying on their side without EXIF: how many plates of held-out photos are still hidden
when their pixels are turned a quarter (an upload tool that strips the EXIF Orientation without
turning the pixels), by which photos get the model's turned view, and what each costs.

    .venv/bin/python bench/bench_sideways.py [--data ../shared/datasets/plates-real-v1] [--photos 0]
                                             [--min-width 16] [--model DIR] [--settings off,portrait,model,all]

Two kinds of photo, each upright, turned a quarter clockwise, upside down and a quarter
anticlockwise: the held-out photos as they are (landscape: on their side they are taller than
wide), and their centres cut as portrait photos (3 wide to 4 tall, around their plates: on their
side they are *wider* than tall, which is what a phone's portrait photo is once its EXIF
Orientation is stripped). Settings:

- ``off``: no turned view (``turned_view`` false);
- ``portrait``: portrait photos turned, landscape ones never (the model before the orientation
  classifier);
- ``model``: as the model folder says (portrait photos, and the landscape ones its orientation
  classifier finds lying on their side);
- ``all``: every photo turned (twice the detector's time).

Prints, per kind, turn and setting, the plates of at least ``--min-width`` px hidden (>= 80 % of
the labelled box inside the masked polygons at the operating threshold) and the detector's time
per photo; and how many upright landscape photos the classifier turns for nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TURNS = {"upright": 0, "quarter clockwise": -1, "upside down": 2, "quarter anticlockwise": 1}


def hidden(mask: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    part = mask[max(0, y0):y1, max(0, x0):x1]
    return part.size > 0 and part.mean() >= 0.8


def raster(shape, plates, threshold: float) -> np.ndarray:
    m = np.zeros(shape[:2], np.uint8)
    for p in plates:
        if p.score >= threshold:
            cv2.fillPoly(m, [np.round(p.polygon).astype(np.int32)], 1)
    return m


def portrait_cut(rgb: np.ndarray, boxes: list) -> tuple[np.ndarray, list]:
    h, w = rgb.shape[:2]
    cw = int(0.75 * h)
    if cw >= w:
        return rgb, boxes
    cx = np.mean([(b[0] + b[2]) / 2 for b in boxes])
    x0 = int(np.clip(cx - cw / 2, 0, w - cw))
    inside = [(b[0] - x0, b[1], b[2] - x0, b[3]) for b in boxes if b[0] >= x0 and b[2] <= x0 + cw]
    return np.ascontiguousarray(rgb[:, x0:x0 + cw]), inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "plates-real-v1"))
    ap.add_argument("--photos", type=int, default=0, help="the first N held-out photos with plates (0: all)")
    ap.add_argument("--min-width", type=float, default=16.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--settings", default="off,portrait,model,all", help="which of off, portrait, model, all to run")
    a = ap.parse_args()
    from platemask.cli import default_model_dir
    from platemask.imageio import decode
    from platemask.segment import Segmenter
    from platemask.training.coco import load_datasets, split_records

    _, val = split_records(load_datasets([a.data]))
    pos = [r for r in val if not r.negative]
    pos = pos[: a.photos] if a.photos else pos
    seg = Segmenter(a.model or default_model_dir())
    threshold = seg.cfg.score_threshold
    classifier = seg.orientation
    print(f"{len(pos)} held-out photos with plates; model {seg.cfg.name}, threshold {threshold}, orientation "
          f"classifier {'threshold ' + str(classifier.threshold) if classifier else 'none'}")
    settings = {"off": (False, None), "portrait": (True, None), "model": (True, classifier), "all": (True, "all")}
    if classifier is None:
        settings.pop("model")
    settings = {k: v for k, v in settings.items() if k in a.settings.split(",")}
    cfg = seg.cfg
    count: dict = {}
    seconds: dict = {}
    upright_turned = upright_wide = 0
    for r in pos:
        dec = decode(r.path.read_bytes())
        boxes = [(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()) for p in r.polygons]
        boxes = [b for b in boxes if b[2] - b[0] >= a.min_width]
        if not boxes:
            continue
        if classifier is not None and dec.rgb.shape[1] >= dec.rgb.shape[0]:
            upright_wide += 1
            upright_turned += classifier.sideways([dec.rgb])[0]
        for kind, (rgb, bxs) in {"photo": (dec.rgb, boxes), "portrait cut": portrait_cut(dec.rgb, boxes)}.items():
            if not bxs:
                continue
            for turn, k in TURNS.items():
                view = np.ascontiguousarray(np.rot90(rgb, k))
                for name, (on, how) in settings.items():
                    seg.cfg = dataclasses.replace(cfg, turned_view=on)
                    seg.orientation = _Always() if how == "all" else how
                    t0 = time.perf_counter()
                    plates = seg([view])[0]
                    seconds[(kind, turn, name)] = seconds.get((kind, turn, name), 0.0) + time.perf_counter() - t0
                    back = np.rot90(raster(view.shape, plates, threshold), -k)
                    key = (kind, turn, name)
                    got, n = count.get(key, (0, 0))
                    count[key] = (got + sum(hidden(back, b) for b in bxs), n + len(bxs))
    seg.cfg, seg.orientation = cfg, classifier
    print(f"\nplates >= {a.min_width:g} px hidden, by how the photo lies and which photos get the turned view "
          f"(detector ms per photo in brackets)")
    names = list(settings)
    print(f"{'photo':14s} {'lying':22s} " + " ".join(f"{n:>18s}" for n in names))
    for kind in ("photo", "portrait cut"):
        for turn in TURNS:
            cells = []
            for n in names:
                got, tot = count.get((kind, turn, n), (0, 0))
                photos = max(1, len(pos))
                cells.append(f"{got:>4d}/{tot:<4d} ({1000 * seconds.get((kind, turn, n), 0) / photos:4.0f})")
            print(f"{kind:14s} {turn:22s} " + " ".join(f"{c:>18s}" for c in cells))
    if classifier is not None:
        print(f"\nupright landscape photos the classifier turned for nothing: {upright_turned} of {upright_wide}")


class _Always:
    """Stands for an orientation classifier that finds every photo lying on its side."""

    threshold = 0.0

    def sideways(self, images):
        return [True for _ in images]


if __name__ == "__main__":
    main()
