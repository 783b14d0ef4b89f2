"""``model.tar.gz`` for SageMaker: the model folder, byte-for-byte reproducible.

Same weights and config -> same bytes -> same SHA-256, so the artifact can be stored under a
content-addressed key and uploaded once. SageMaker unpacks it into /opt/ml/model, where the
container's server loads it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

from .model import load_config

FILES = ("config.json", "MODEL_CARD.md")


def package_model(model_dir: str | Path, out: str | Path | None = None) -> tuple[bytes, str]:
    """Return (tar.gz bytes, sha256); also write them to ``out`` when given."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    names = sorted({*(f for f in FILES if (model_dir / f).is_file()), cfg.weights,
                    *([cfg.verifier.get("weights", "verifier.pt")] if cfg.verifier else []),
                    *([cfg.orientation.get("weights", "orientation.pt")] if cfg.orientation else []),
                    *(v["file"] for v in cfg.onnx.values() if isinstance(v, dict) and v.get("file"))})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = (model_dir / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6, filename="") as f:
        f.write(raw.getvalue())
    blob = gz.getvalue()
    if out is not None:
        Path(out).write_bytes(blob)
    return blob, hashlib.sha256(blob).hexdigest()
