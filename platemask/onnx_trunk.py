"""The detector's convolutional trunk on ONNX Runtime, for CPU inference.

The trunk is everything in the Mask R-CNN that is plain convolution over the whole view: the
MobileNetV2 backbone, the FPN and the RPN head. On two CPU cores it is two thirds of the model
time, and ONNX Runtime runs it ~1.6x faster than PyTorch's channels-last oneDNN path (measured
by ``bench/bench_mask.py --runtime``). The rest of the model (anchors, proposals, RoIAlign, box
and mask heads, NMS) stays in torchvision, so both runtimes share every decision made after the
trunk.

A model folder ships the trunk as ``trunk.onnx`` beside ``weights.pt``; ``config.json`` records
its SHA-256 and the SHA-256 of the weights it was exported from, so a trunk that does not belong
to the folder's weights is refused rather than used. ``platemask export-onnx`` writes it (the
``onnx`` package is needed there only; inference needs ``onnxruntime``).
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

TRUNK_FILE = "trunk.onnx"
OPSET = 17
INPUT_NAME = "images"
# output order of the exported graph: FPN levels, then RPN objectness per level, then box deltas per level
LEVELS = ("0", "1", "2", "pool")


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


def export_trunk(model: nn.Module, path: str | Path, *, sample_hw: tuple[int, int] = (512, 896)) -> None:
    """Write ``model``'s trunk to ``path`` (dynamic batch, height and width). Needs the ``onnx`` package."""
    trunk = TrunkForExport(model).eval()
    x = torch.rand(1, 3, *sample_hw)
    names = [f"feat_{k}" for k in LEVELS] + [f"objectness_{k}" for k in LEVELS] + [f"deltas_{k}" for k in LEVELS]
    dyn = {INPUT_NAME: {0: "n", 2: "h", 3: "w"}}
    dyn.update({n: {0: "n", 2: f"h_{n}", 3: f"w_{n}"} for n in names})
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; say so plainly)
    except ImportError as e:
        raise ImportError("exporting the ONNX trunk needs the onnx package: pip install -e '.[export]'") from e
    # torch's TorchScript-based exporter (dynamo=False): it handles the FPN's dynamic shapes without
    # onnxscript; it warns that it is deprecated, which says nothing about this export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(trunk, (x,), str(path), input_names=[INPUT_NAME], output_names=names,
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxTrunk(nn.Module):
    """Stands in for ``model.backbone``: runs the exported trunk and keeps the RPN head's outputs
    of the same call for :class:`PrecomputedRPNHead` (per thread, so concurrent callers never mix)."""

    def __init__(self, path: str | Path, *, out_channels: int, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle ORT threads must not spin: the pipeline decodes, masks and encodes in threads beside the model
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.out_channels = out_channels
        self._local = threading.local()

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        outs = [torch.from_numpy(a) for a in self.session.run(None, {INPUT_NAME: x.float().contiguous().numpy()})]
        n = len(LEVELS)
        feats = OrderedDict(zip(LEVELS, outs[:n]))
        self._local.head = (feats[LEVELS[0]], outs[n:2 * n], outs[2 * n:3 * n])
        return feats

    def head_outputs(self, first_level: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        key, objectness, deltas = getattr(self._local, "head", (None, None, None))
        self._local.head = None
        if key is None or key is not first_level:
            raise RuntimeError("the RPN asked for head outputs of features this trunk did not compute")
        return objectness, deltas


class PrecomputedRPNHead(nn.Module):
    """Stands in for ``model.rpn.head``: returns what the ONNX trunk computed for these features."""

    def __init__(self, trunk: OnnxTrunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, features: list[torch.Tensor]):
        return self.trunk.head_outputs(features[0])


def attach_trunk(model: nn.Module, model_dir: str | Path, spec: dict, *, weights_sha256: str,
                 threads: int | None = None) -> None:
    """Swap ``model``'s backbone and RPN head for the ONNX trunk ``spec`` (config.json's ``onnx``) names,
    after checking it belongs to these weights and is intact."""
    from .model import sha256_file

    path = Path(model_dir) / spec.get("file", TRUNK_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX trunk {path} is missing (config.json names it): run "
                                f"'platemask export-onnx --model {model_dir}' or use --runtime torch")
    if spec.get("weights_sha256") != weights_sha256:
        raise ValueError(f"ONNX trunk {path} was exported from other weights ({str(spec.get('weights_sha256'))[:12]}…, "
                         f"the folder's are {weights_sha256[:12]}…): re-run 'platemask export-onnx --model {model_dir}'")
    want = spec.get("sha256")
    if not want or sha256_file(path) != want:
        raise ValueError(f"ONNX trunk {path} does not match the SHA-256 in config.json: the model folder is "
                         f"corrupt or mixed; re-run 'platemask export-onnx --model {model_dir}'")
    trunk = OnnxTrunk(path, out_channels=model.backbone.out_channels, threads=threads)
    model.backbone = trunk
    model.rpn.head = PrecomputedRPNHead(trunk)


def write_trunk(model_dir: str | Path) -> dict:
    """Export the folder's detector trunk to ``trunk.onnx`` and record it in ``config.json`` (returns the entry).

    Exported from the weights as inference loads them (fp16 file, upcast to fp32, batch norm
    folded), so both runtimes compute the same function.
    """
    from .model import fuse_frozen_bn, load_model, sha256_file

    model, cfg = load_model(model_dir)
    fuse_frozen_bn(model)
    path = Path(model_dir) / TRUNK_FILE
    export_trunk(model.eval(), path)
    cfg.onnx = {"file": TRUNK_FILE, "sha256": sha256_file(path), "weights_sha256": cfg.weights_sha256,
                "opset": OPSET, "exported_with_torch": torch.__version__.split("+")[0]}
    (Path(model_dir) / "config.json").write_text(cfg.to_json())
    return cfg.onnx


def choose_runtime(runtime: str, device: torch.device, spec: dict) -> str:
    """"torch" or "onnx" for a run: ``auto`` takes ONNX Runtime on CPU when the folder ships a trunk."""
    from .constants import RUNTIMES

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    if runtime == "onnx":
        if device.type != "cpu":
            raise ValueError("--runtime onnx runs the trunk on CPU only; use --runtime torch (or auto) with a GPU")
        if not spec:
            raise ValueError("--runtime onnx: this model folder ships no ONNX trunk; run 'platemask export-onnx "
                             "--model DIR' or use --runtime torch")
        if not onnxruntime_available():
            raise ValueError("--runtime onnx needs the onnxruntime package (pip install onnxruntime)")
        return "onnx"
    return "onnx" if device.type == "cpu" and spec and onnxruntime_available() else "torch"
