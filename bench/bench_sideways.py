"""Photos lying sideways without EXIF: how many held-out photos with plates still get a mask when
their pixels are turned a quarter (an upload tool that strips the EXIF Orientation without turning
the pixels), with the model's turned view (``ModelConfig.turned_view``) on and off.

    .venv/bin/python bench/bench_sideways.py [--data ../shared/datasets/plates-real-v1] [--photos 30]
                                             [--min-width 40] [--model DIR]

Prints, per turn (0, 90, 180, 270 degrees counter-clockwise) and setting, the photos with any
detection at the model's operating threshold out of the first ``--photos`` held-out photos whose
plates are all at least ``--min-width`` px wide, and the seconds the detector took.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "plates-real-v1"))
    ap.add_argument("--photos", type=int, default=30)
    ap.add_argument("--min-width", type=float, default=40.0)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    from platemask.cli import default_model_dir
    from platemask.imageio import decode
    from platemask.segment import Segmenter
    from platemask.training.coco import load_datasets, split_records

    _, val = split_records(load_datasets([a.data]))
    pos = [r for r in val if not r.negative and all(np.ptp(p[:, 0]) >= a.min_width for p in r.polygons)][: a.photos]
    seg = Segmenter(a.model or default_model_dir())
    on = seg.cfg
    t = on.score_threshold
    rgbs = [decode(Path(r.path).read_bytes()).rgb for r in pos]
    for turned_view in (False, True):
        seg.cfg = dataclasses.replace(on, turned_view=turned_view)
        for quarter in (0, 1, 2, 3):
            t0, hits = time.perf_counter(), 0
            for rgb in rgbs:
                found = seg([np.ascontiguousarray(np.rot90(rgb, quarter))])[0]
                hits += any(p.score >= t for p in found)
            print(f"turned_view={str(turned_view).lower():5s} turned {90 * quarter:3d} deg: {hits} of {len(rgbs)} photos "
                  f"with a mask at {t} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
