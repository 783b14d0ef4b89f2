"""Writing a model folder's ONNX graphs (``platemask export-onnx``): the detector's trunk, the verifier and
the orientation classifier.

The file names, the trunk's output order and the checks that tie each graph to its weights live in
:mod:`platemask.onnx_runtime` (the inference side, which never imports this module).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .model import fuse_frozen_bn, load_model, sha256_file
from .onnx_runtime import INPUT_NAME, LEVELS, OPSET, ORIENTATION_FILE, TRUNK_FILE, VERIFIER_FILE
from .orientation import INPUT_SIDE, load_orientation
from .verify import INPUT_HW, load_verifier


class TrunkForExport(nn.Module):
    """backbone + FPN + RPN head as one graph with a flat tuple of outputs (see ``LEVELS``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.rpn.head

    def forward(self, x: torch.Tensor):
        feats = self.backbone(x)
        if tuple(feats) != LEVELS:
            raise ValueError(f"the backbone's levels {tuple(feats)} are not {LEVELS}")
        f = list(feats.values())
        objectness, deltas = self.head(f)
        return (*f, *objectness, *deltas)


def _export(module: nn.Module, sample: torch.Tensor, path: Path, output_names: list[str], dynamic: dict) -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; say so plainly)
    except ImportError as e:
        raise ImportError("exporting ONNX graphs needs the onnx package: pip install -e '.[export]'") from e
    # torch's TorchScript-based exporter (dynamo=False): it handles the FPN's dynamic shapes without
    # onnxscript; it warns that it is deprecated, which says nothing about this export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (sample,), str(path), input_names=[INPUT_NAME], output_names=output_names,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def export_trunk(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s trunk to ``path`` (dynamic batch, height and width)."""
    names = [f"feat_{k}" for k in LEVELS] + [f"objectness_{k}" for k in LEVELS] + [f"deltas_{k}" for k in LEVELS]
    dyn = {INPUT_NAME: {0: "n", 2: "h", 3: "w"}}
    dyn.update({n: {0: "n", 2: f"h_{n}", 3: f"w_{n}"} for n in names})
    _export(TrunkForExport(model), torch.rand(1, 3, 512, 896), Path(path), names, dyn)


def export_verifier(net: nn.Module, path: str | Path) -> None:
    """Write the verifier network to ``path`` (dynamic batch of crops)."""
    _export(net, torch.rand(2, 3, *INPUT_HW), Path(path), ["logit"], {INPUT_NAME: {0: "n"}, "logit": {0: "n"}})


def export_orientation(net: nn.Module, path: str | Path) -> None:
    """Write the orientation classifier to ``path`` (dynamic batch of letterboxed photos)."""
    _export(net, torch.rand(2, 3, INPUT_SIDE, INPUT_SIDE), Path(path), ["logits"], {INPUT_NAME: {0: "n"}, "logits": {0: "n"}})


def write_onnx(model_dir: str | Path) -> dict:
    """Export the folder's detector trunk (and its verifier and orientation classifier, when it has
    them) and record them in ``config.json``; returns the ``onnx`` entry."""
    model_dir = Path(model_dir)
    model, cfg = load_model(model_dir)
    fuse_frozen_bn(model)
    export_trunk(model, model_dir / TRUNK_FILE)
    entry: dict = {"opset": OPSET, "exported_with_torch": torch.__version__.split("+")[0],
                   "trunk": {"file": TRUNK_FILE, "sha256": sha256_file(model_dir / TRUNK_FILE),
                             "weights_sha256": cfg.weights_sha256}}
    if cfg.verifier:
        verifier = load_verifier(model_dir, cfg.verifier, runtime="torch")
        export_verifier(verifier.net.to(memory_format=torch.contiguous_format), model_dir / VERIFIER_FILE)
        entry["verifier"] = {"file": VERIFIER_FILE, "sha256": sha256_file(model_dir / VERIFIER_FILE),
                             "weights_sha256": cfg.verifier.get("weights_sha256", "")}
    if cfg.orientation:
        classifier = load_orientation(model_dir, cfg.orientation, runtime="torch")
        export_orientation(classifier.net.to(memory_format=torch.contiguous_format), model_dir / ORIENTATION_FILE)
        entry["orientation"] = {"file": ORIENTATION_FILE, "sha256": sha256_file(model_dir / ORIENTATION_FILE),
                                "weights_sha256": cfg.orientation.get("weights_sha256", "")}
    cfg.onnx = entry
    (model_dir / "config.json").write_text(cfg.to_json())
    return entry
