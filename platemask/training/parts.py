"""Writing a trained part (the verifier, the orientation classifier) into a model folder."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def save_part(net: nn.Module, model_dir: str | Path, *, field: str, file: str, spec: dict) -> dict:
    """Write ``net``'s weights (fp16) as ``file`` into ``model_dir`` and record them in its
    ``config.json`` as ``field`` (``{"weights", "weights_sha256", **spec}``). An ONNX graph recorded
    for ``field`` is of the previous weights and is dropped from the record (the part runs on PyTorch
    until ``platemask export-onnx`` exports the new one). Returns the new entry."""
    from ..model import load_config, sha256_file

    model_dir = Path(model_dir)
    path = model_dir / file
    # written beside and renamed: a kill or a full disk mid-write leaves the old weights, which
    # still match config.json, so the model folder keeps loading
    tmp = model_dir / f"{file}.tmp"
    try:
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    cfg = load_config(model_dir)
    entry = {"weights": path.name, "weights_sha256": sha256_file(tmp), **spec}
    setattr(cfg, field, entry)
    if cfg.onnx.get(field):
        cfg.onnx = {k: v for k, v in cfg.onnx.items() if k != field}
    cfg_tmp = model_dir / "config.json.tmp"
    cfg_tmp.write_text(cfg.to_json())
    tmp.replace(path)  # from here to the next line the folder is refused (hash mismatch), never loaded mixed
    cfg_tmp.replace(model_dir / "config.json")
    return entry
