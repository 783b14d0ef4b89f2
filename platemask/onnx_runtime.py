"""The model's convolutions on ONNX Runtime, for CPU inference.

Two parts of the model are plain convolution networks, and on two CPU cores ONNX Runtime runs them
much faster than PyTorch's channels-last oneDNN path (``bench/bench_mask.py --runtime``):

* the detector's **trunk**: the MobileNetV2 backbone, the FPN and the RPN head, over the whole
  view; two thirds of the model time. The rest of the Mask R-CNN (anchors, proposals, RoIAlign,
  box and mask heads, NMS) stays in torchvision, so both runtimes share every decision after it;
* the **verifier**: a MobileNetV2 over a few 64 x 128 crops per photo, where PyTorch's fixed cost
  per call dominates.

A model folder ships them as ``trunk.onnx`` and ``verifier.onnx`` beside the weights;
``config.json``'s ``onnx`` entry records each file's SHA-256 and the SHA-256 of the weights it was
exported from, so a graph that does not belong to the folder's weights is refused, never used.
``platemask export-onnx`` writes them (:mod:`platemask.onnx_export`; it needs the ``onnx``
package, inference needs only ``onnxruntime``). The graphs are exported from the weights as inference loads them (the fp16 file
upcast to fp32, batch norm folded), so both runtimes compute the same function.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

TRUNK_FILE = "trunk.onnx"
VERIFIER_FILE = "verifier.onnx"
ORIENTATION_FILE = "orientation.onnx"
OPSET = 17
INPUT_NAME = "images"
# output order of the trunk graph: FPN levels, then RPN objectness per level, then box deltas per level
LEVELS = ("0", "1", "2", "pool")


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no memory pattern: it plans one block for every intermediate of a call at once; without it the
    # arena reuses each tensor's chunk as soon as it is freed. 60-80 MB less peak RSS in the CLI on
    # 1280 x 720 photos at batch 4, no slower (bench/bench_mask.py)
    so.enable_mem_pattern = False
    # idle ORT threads must not spin: the pipeline decodes, masks and encodes in threads beside the model
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxTrunk(nn.Module):
    """Stands in for ``model.backbone``: runs the exported trunk and keeps the RPN head's outputs
    of the same call for :class:`PrecomputedRPNHead` (per thread, so concurrent callers never mix)."""

    def __init__(self, path: str | Path, *, out_channels: int, threads: int | None = None):
        super().__init__()
        self.session = session(path, threads)
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


class OnnxNet(nn.Module):
    """A one-input, one-output network on ONNX Runtime (the verifier): tensor in, tensor out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        self.session = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: x.float().contiguous().numpy()})[0])


def load_classifier_net(build: Callable[[], nn.Module], path: str | Path, *, device: torch.device,
                        onnx_path: str | Path | None = None, threads: int | None = None) -> tuple[nn.Module, str]:
    """A small second-look network (the verifier, the orientation classifier) ready for inference, and
    its runtime: on ONNX Runtime (CPU) from ``onnx_path`` when given, else ``build()`` with the fp16
    state dict at ``path`` loaded in float32, batch norm folded, on ``device`` (channels-last on a CPU)."""
    if onnx_path:
        return OnnxNet(onnx_path, threads), "onnx"
    from .model import fuse_frozen_bn

    net = build()
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    fuse_frozen_bn(net)
    net.eval().to(device)
    if device.type == "cpu":
        net.to(memory_format=torch.channels_last)
    return net, "torch"


def checked_path(model_dir: str | Path, spec: dict, *, part: str, default_file: str, weights_sha256: str) -> Path:
    """The ONNX file ``spec`` names, after checking it belongs to ``weights_sha256`` and is intact."""
    from .model import sha256_file

    path = Path(model_dir) / spec.get("file", default_file)
    fix = f"re-run 'platemask export-onnx --model {model_dir}' (or use --runtime torch)"
    if not path.is_file():
        raise FileNotFoundError(f"ONNX {part} {path} is missing (config.json names it): {fix}")
    if spec.get("weights_sha256") != weights_sha256:
        raise ValueError(f"ONNX {part} {path} was exported from other weights ({str(spec.get('weights_sha256'))[:12]}…, "
                         f"the folder's are {weights_sha256[:12]}…): {fix}")
    want = spec.get("sha256")
    if not want or sha256_file(path) != want:
        raise ValueError(f"ONNX {part} {path} does not match the SHA-256 in config.json: the model folder is "
                         f"corrupt or mixed; {fix}")
    return path


def attach_trunk(model: nn.Module, model_dir: str | Path, spec: dict, *, weights_sha256: str,
                 threads: int | None = None) -> None:
    """Swap ``model``'s backbone and RPN head for the checked ONNX trunk ``spec`` names."""
    path = checked_path(model_dir, spec, part="trunk", default_file=TRUNK_FILE, weights_sha256=weights_sha256)
    trunk = OnnxTrunk(path, out_channels=model.backbone.out_channels, threads=threads)
    model.backbone = trunk
    model.rpn.head = PrecomputedRPNHead(trunk)


def choose_runtime(runtime: str, device: torch.device, spec: dict) -> str:
    """"torch" or "onnx" for a run: ``auto`` takes ONNX Runtime on CPU when the folder ships its graphs."""
    from .constants import RUNTIMES

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    if runtime == "onnx":
        if device.type != "cpu":
            raise ValueError("--runtime onnx runs on CPU only; use --runtime torch (or auto) with a GPU")
        if not spec.get("trunk"):
            raise ValueError("--runtime onnx: this model folder ships no ONNX graphs; run 'platemask export-onnx "
                             "--model DIR' or use --runtime torch")
        if not onnxruntime_available():
            raise ValueError("--runtime onnx needs the onnxruntime package (pip install onnxruntime)")
        return "onnx"
    return "onnx" if device.type == "cpu" and spec.get("trunk") and onnxruntime_available() else "torch"
