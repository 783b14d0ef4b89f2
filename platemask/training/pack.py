"""Pack the training split of COCO data sets into small folders for a remote GPU machine.

    python -m platemask.training.pack --data ../shared/datasets/plates-real-v1 \\
        --data ../shared/datasets/negatives-interior-v1 --out runs/pack --parts 2

A lent GPU machine takes a limited upload (64 MiB here), and the two data sets are 233 MB of JPEG.
Training never sees a photo at its stored size: each sample rescales the photo to a random long
side (``AugmentConfig.long_side``, or crop units for negatives), so the stored resolution only sets
how much detail survives. Each positive photo is therefore shrunk as far as its smallest plate
stays ``min_plate_px`` wide (never below ``min_scale``, never enlarged), each negative to
``negative_side`` on its long side, and all are written as WebP (OpenCV reads it whatever the name);
polygons and boxes are scaled with their photo. Held-out photos (``split_of``) are never copied, so
nothing packed can leak into the evaluation.

``--parts N`` spreads the positive photos over N folders by a stable hash of their id and puts
every negative photo in each part: each part is a complete training set on its own (negatives
first-class), to be trained on one after another when one upload cannot hold them all.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .coco import annotation_polygons, identity, split_group, split_of


def part_of(img: dict, parts: int) -> int:
    """Which part (0-based) a positive photo goes to: a stable hash of its id in the COCO file."""
    return int(hashlib.sha1(str(img["id"]).encode()).hexdigest(), 16) % parts


def photo_scale(anns: list[dict], *, min_plate_px: float, min_scale: float) -> float:
    """How far a positive photo may shrink: its smallest plate (outline, else box: as training reads
    it) keeps ``min_plate_px`` of width."""
    smallest = min(float(np.ptp(p[:, 0])) for a in anns for p in annotation_polygons(a))
    return float(np.clip(min_plate_px / max(smallest, 1.0), min_scale, 1.0))


def _scaled_annotation(ann: dict, sx: float, sy: float) -> dict:
    out = dict(ann)
    if ann.get("bbox"):
        x, y, w, h = ann["bbox"]
        out["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    if isinstance(ann.get("segmentation"), list):
        out["segmentation"] = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(s)] for s in ann["segmentation"]]
    if "area" in ann:
        out["area"] = float(ann["area"]) * sx * sy
    return out


def pack(root: str | Path, out: str | Path, *, parts: int = 1, val_fraction: float = 0.15,
         min_plate_px: float = 40.0, min_scale: float = 0.55, quality: int = 70,
         negative_side: int = 720, negative_quality: int = 60, category: str = "plate") -> dict:
    """Write ``out/part-K/<root's name>/`` for K in 1..parts; returns counts and bytes per part."""
    root, out = Path(root), Path(out)
    if parts < 1:
        raise ValueError(f"parts={parts}: need at least one part")
    doc = json.loads((root / "annotations.json").read_text())
    cat_ids = {c["id"] for c in doc.get("categories", []) if c.get("name") == category}
    anns: dict[int, list[dict]] = {}
    for a in doc.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    head = {k: v for k, v in doc.items() if k not in ("images", "annotations")}
    head["info"] = {**doc.get("info", {}), "packed_from": root.name, "packed_with": {
        "val_fraction": val_fraction, "min_plate_px": min_plate_px, "min_scale": min_scale, "quality": quality,
        "negative_side": negative_side, "negative_quality": negative_quality, "parts": parts}}
    docs = [{**head, "images": [], "annotations": []} for _ in range(parts)]
    stats = [{"images": 0, "positives": 0, "negatives": 0, "bytes": 0} for _ in range(parts)]
    for img in doc["images"]:
        if split_of(split_group(img), val_fraction) == "val":
            continue
        plates = [a for a in anns.get(img["id"], []) if a.get("category_id") in cat_ids and not a.get("iscrowd", 0)]
        negative = bool(img.get("negative")) or not plates
        src = root / img["file_name"]
        bgr = cv2.imread(str(src), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{src}: cannot decode this training photo; fix or remove it from {root / 'annotations.json'}")
        h, w = bgr.shape[:2]
        if negative:
            scale, q = min(1.0, negative_side / max(h, w)), negative_quality
            targets = range(parts)
        else:
            scale, q = photo_scale(plates, min_plate_px=min_plate_px, min_scale=min_scale), quality
            targets = [part_of(img, parts)]
        if scale < 1.0:
            bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        sx, sy = bgr.shape[1] / w, bgr.shape[0] / h
        ok, buf = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, int(q)])
        if not ok:
            raise ValueError(f"{src}: WebP encoding failed")
        # the old name + ".webp": a.jpg and a.png stay two files; the identity is written down, since a
        # photo named by its file would otherwise become another photo (and maybe fall in the held-out split)
        name = img["file_name"] + ".webp"
        record = {**img, "file_name": name, "width": bgr.shape[1], "height": bgr.shape[0], "identity": identity(img)}
        for k in targets:
            dst = out / f"part-{k + 1}" / root.name / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(buf.tobytes())
            docs[k]["images"].append(record)
            docs[k]["annotations"].extend(_scaled_annotation(a, sx, sy) for a in anns.get(img["id"], []))
            stats[k]["images"] += 1
            stats[k]["negatives" if negative else "positives"] += 1
            stats[k]["bytes"] += len(buf)
    for k, d in enumerate(docs):
        folder = out / f"part-{k + 1}" / root.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "annotations.json").write_text(json.dumps(d))
    return {"data": root.name, "parts": stats}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, action="append", help="COCO folder (repeat for several)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", type=int, default=1)
    ap.add_argument("--val-fraction", type=float, default=0.15, help="must match training's (held-out photos stay behind)")
    ap.add_argument("--min-plate-px", type=float, default=40.0)
    ap.add_argument("--min-scale", type=float, default=0.55)
    ap.add_argument("--quality", type=int, default=70)
    ap.add_argument("--negative-side", type=int, default=720)
    ap.add_argument("--negative-quality", type=int, default=60)
    a = ap.parse_args(argv)
    for root in a.data:
        r = pack(root, a.out, parts=a.parts, val_fraction=a.val_fraction, min_plate_px=a.min_plate_px,
                 min_scale=a.min_scale, quality=a.quality, negative_side=a.negative_side,
                 negative_quality=a.negative_quality)
        for k, s in enumerate(r["parts"]):
            print(f"{r['data']} part-{k + 1}: {s['positives']} positive + {s['negatives']} negative photos, "
                  f"{s['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
