"""COCO plate annotations: loading, the held-out split, and per-image records.

The split is a pure function of each image's split group, so training, evaluation and the
model card agree on it without a stored list. The group is the image's identity (Open Images
id, else SHA-1, else file name), so a photo that upstream exported twice can never land on both
sides; for sets whose images carry a ``date`` (the interior negatives: a few dozen vehicles
photographed on many days) it is the source and the day, so the same cluster photographed on
one day never lands on both sides either.

Several data sets can be used together (``--data A --data B``): each record keeps its
``category`` (``plate`` for photos with plates, else the set's ``negative_kind``, e.g.
``vin_plate_closeup``, ``odometer_digital``), and evaluation reports false positives per
category, so a new kind of negative slots in as one more folder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Record:
    """One image and its plates as polygons (N, K, 2) in pixel coordinates of the file."""

    path: Path
    width: int
    height: int
    polygons: list[np.ndarray] = field(default_factory=list)
    negative: bool = False
    image_id: int = 0
    identity: str = ""
    source: str = ""
    category: str = "plate"
    split_group: str = ""


def identity(img: dict) -> str:
    """What names the photo itself: an explicit ``identity`` (kept by copies, e.g. ``training.pack``),
    else its Open Images id, else its SHA-1, else its file name."""
    return str(img.get("identity") or img.get("open_images_id") or img.get("sha1") or img["file_name"])


def split_group(img: dict) -> str:
    """What the split hashes: the day for sets photographed over many days, else the identity."""
    if img.get("date"):
        return f"{img.get('source', '')}:{img['date']}"
    return identity(img)


def split_of(ident: str, val_fraction: float = 0.15) -> str:
    """'val' for a stable ``val_fraction`` of identities, else 'train'."""
    h = int(hashlib.sha256(ident.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def annotation_polygons(ann: dict) -> list[np.ndarray]:
    seg = ann.get("segmentation")
    polys = []
    if isinstance(seg, list) and seg:
        for s in seg:
            if len(s) >= 6:
                polys.append(np.asarray(s, dtype=np.float32).reshape(-1, 2))
    if not polys:
        x, y, w, h = ann["bbox"]
        polys.append(np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float32))
    return polys


def _visible(poly: np.ndarray, width: int, height: int) -> bool:
    """Whether a label covers any area of the photo: a box of zero width or height, or one wholly
    outside the photo, labels nothing (it would count as a plate no mask can hide)."""
    x0, y0, x1, y1 = poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max()
    return min(x1, width) - max(x0, 0) > 0 and min(y1, height) - max(y0, 0) > 0


def unique_polygons(polys: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``polys`` without repeats (an annotation exported twice is one plate, not two)."""
    seen, out = set(), []
    for p in polys:
        key = tuple(np.round(np.asarray(p, np.float64), 2).reshape(-1).tolist())
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def load_coco(root: str | Path, annotations: str = "annotations.json", category: str = "plate") -> list[Record]:
    """Read a COCO file. Images with no annotation of ``category`` are negatives (first-class).

    Each plate is counted once: repeated annotations are one plate, and labels with no area in the
    photo (zero width or height, wholly outside it) are dropped."""
    root = Path(root)
    doc = json.loads((root / annotations).read_text())
    cat_ids = {c["id"] for c in doc.get("categories", []) if c.get("name") == category}
    if not cat_ids:
        raise ValueError(f"{root / annotations} has no category named {category!r}")
    declared = {c.get("id") for c in doc.get("categories", [])}
    undeclared = sorted({repr(a.get("category_id")) for a in doc.get("annotations", [])
                         if a.get("category_id") not in declared})
    if undeclared:
        # its photos would silently become negatives: plates taught as background
        raise ValueError(
            f"{root / annotations}: annotations have category_id {', '.join(undeclared)}, which no entry of "
            f"'categories' declares (declared: {sorted(declared, key=repr)}); fix the ids (plates are the "
            f"category named {category!r})")
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in doc.get("annotations", []):
        bbox = ann.get("bbox")
        if isinstance(bbox, (list, tuple)) and len(bbox) == 4 and (bbox[2] < 0 or bbox[3] < 0):
            raise ValueError(
                f"{root / annotations}: annotation {ann.get('id')} (image {ann.get('image_id')}) has a negative "
                f"width or height in its bbox {bbox}; COCO boxes are [x, y, width, height]")
        if ann.get("category_id") in cat_ids and not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).extend(annotation_polygons(ann))
    records = []
    for img in doc["images"]:
        w, h = int(img["width"]), int(img["height"])
        polys = unique_polygons([p for p in by_image.get(img["id"], []) if _visible(p, w, h)])
        negative = bool(img.get("negative")) or not polys
        records.append(
            Record(
                path=root / img["file_name"],
                width=int(img["width"]),
                height=int(img["height"]),
                polygons=polys,
                negative=negative,
                image_id=int(img["id"]),
                identity=identity(img),
                source=str(img.get("source", "")),
                category=str(img.get("negative_kind") or ("negative" if negative else "plate")),
                split_group=split_group(img),
            )
        )
    return records


def load_datasets(roots: str | Path | Sequence[str | Path]) -> list[Record]:
    """Records of one or several COCO folders, in the order given (image ids stay per folder).

    A photo is one record however often it is listed (twice in one annotations.json, or the same
    folder given twice): its labels are merged, repeats dropped, so it is neither evaluated nor
    counted twice."""
    if isinstance(roots, (str, Path)):
        roots = [roots]
    if not roots:
        raise ValueError("no data set given: pass at least one COCO folder")
    by_path: dict[Path, Record] = {}
    for root in roots:
        for r in load_coco(root):
            key = Path(r.path).resolve()
            first = by_path.setdefault(key, r)
            if first is not r:
                first.polygons = unique_polygons(first.polygons + r.polygons)
                if first.negative and not r.negative:  # one listing has plates and is no negative
                    first.negative, first.category = False, r.category
    return list(by_path.values())


def split_records(records: list[Record], val_fraction: float = 0.15) -> tuple[list[Record], list[Record]]:
    train, val = [], []
    for r in records:
        (val if split_of(r.split_group or r.identity, val_fraction) == "val" else train).append(r)
    return train, val
