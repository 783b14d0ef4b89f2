"""The detection record: what segmentation produces and masking and QA consume.

Both backends (local workers, SageMaker containers) emit exactly this JSON, one record per
input image; ``Plate`` is its in-memory form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import polygon_box

STATUSES = ("masked", "no_plate", "failed")


@dataclass
class Plate:
    score: float
    polygon: np.ndarray  # (K, 2) float32, output-image pixels, fail-safe outline (no margin)

    @property
    def box(self) -> list[float]:
        return polygon_box(self.polygon)

    def to_json(self) -> dict[str, Any]:
        return {
            "score": round(float(self.score), 4),
            "polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in self.polygon],
            "box": [round(v, 1) for v in self.box],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plate":
        poly = np.asarray(d["polygon"], np.float32).reshape(-1, 2)
        if len(poly) < 3:
            raise ValueError(f"plate polygon needs at least 3 points, got {len(poly)}")
        return cls(score=float(d["score"]), polygon=poly)


def record(key: str, *, status: str, width: int | None = None, height: int | None = None,
           plates: list[Plate] | None = None, error: str | None = None, reason: str | None = None,
           model: dict | None = None, input_sha256: str | None = None, output_sha256: str | None = None,
           review: bool = False, **extra: Any) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    rec: dict[str, Any] = {
        "key": key,
        "status": status,
        "width": width,
        "height": height,
        "plates": [p.to_json() for p in plates or []],
        "model": model,
        "input_sha256": input_sha256,
        "output_sha256": output_sha256,
        "review": review,
    }
    if status == "failed":
        rec["error"] = error or "unknown error"
        rec["reason"] = reason or "error"
    rec.update(extra)
    return rec
