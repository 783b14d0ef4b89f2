"""Mask R-CNN for licence plates: one builder, one loader, one saver.

The architecture is torchvision's Mask R-CNN (detectron2 has no wheels for torch 2.x) on a
MobileNetV2 backbone with an FPN built from its stride-8, 16 and 32 layers, anchors and heads
sized for small, wide objects. Everything the loader needs is in ``config.json`` next to the
weights, so a shipped model loads without the training code or the ImageNet weights package.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

CLASSES = ("__background__", "plate")

# MobileNetV2 ``features`` indices whose outputs feed the FPN: stride 8 (32 ch), 16 (96 ch), 32 (320 ch).
_MNV2_RETURN = {"6": "0", "13": "1", "17": "2"}
_MNV2_CHANNELS = [32, 96, 320]


@dataclass(frozen=True)
class Architecture:
    """Everything that shapes the network. Stored in config.json; changing it needs retraining."""

    backbone: str = "mobilenet_v2"
    fpn_channels: int = 96
    anchor_sizes: tuple[tuple[int, ...], ...] = ((12, 20), (32, 48), (72, 112), (160, 320))
    aspect_ratios: tuple[float, ...] = (0.25, 0.5, 1.0)  # height / width: plates are wide
    box_head_dim: int = 256
    mask_head_channels: int = 96
    mask_head_layers: int = 3
    rpn_pre_nms_top_n_test: int = 600
    rpn_post_nms_top_n_test: int = 200
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 400
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 96
    box_detections_per_img: int = 60
    box_score_thresh: float = 0.02
    box_nms_thresh: float = 0.4
    trainable_from: int = 4  # MobileNetV2 features[:trainable_from] stay frozen

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        d = dict(d)
        if "anchor_sizes" in d:
            d["anchor_sizes"] = tuple(tuple(int(s) for s in lvl) for lvl in d["anchor_sizes"])
        if "aspect_ratios" in d:
            d["aspect_ratios"] = tuple(float(a) for a in d["aspect_ratios"])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown architecture keys in config.json: {sorted(unknown)}")
        return cls(**d)


@dataclass
class ModelConfig:
    """Contents of ``models/<name>/config.json``."""

    name: str
    architecture: Architecture = field(default_factory=Architecture)
    input_max_side: int = 896  # long side the detector sees (images are only ever shrunk to it)
    tile_above: float = 2.0  # also run tiles when the long side exceeds tile_above * input_max_side
    tile_overlap: float = 0.2
    coarse_side: int = 0  # also run the whole photo at this long side (finds close-ups filling the frame); 0 = off
    # a portrait photo (taller than wide) also runs turned a quarter: a landscape photo whose pixels
    # lie sideways without an EXIF Orientation (an upload tool stripped it) shows its plates on end,
    # which the detector, trained upright, misses; turned once they are upright or upside down, both found
    turned_view: bool = True
    score_threshold: float = 0.5  # operating threshold: a detection above it is masked
    review_low: float = 0.15  # detections in [review_low, score_threshold) flag the image for review
    review_high: float = 0.7  # masked detections below review_high also flag it
    # an unusual result flags a photo too: more masks than review_max_masks, or masks covering more
    # than review_max_masked_fraction of it (fitted with the band by `evaluate --set-threshold`)
    review_max_masks: int = 6
    review_max_masked_fraction: float = 0.2
    # isotonic map fused score -> probability of a plate, [[score, p], ...] (platemask.review.calibrate)
    calibration: list = field(default_factory=list)
    mask_threshold: float = 0.4  # per-pixel mask probability kept in the polygon
    classes: tuple[str, ...] = CLASSES
    weights: str = "weights.pt"
    weights_sha256: str = ""
    verifier: dict[str, Any] = field(default_factory=dict)  # second-look classifier (platemask.verify); {} = none
    # which landscape photos also get the turned view (platemask.orientation); {} = none: portrait ones only
    orientation: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)  # graphs for ONNX Runtime (platemask.onnx_runtime); {} = none
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self, *, verify: bool = True) -> dict[str, str]:
        """What detection records name as their model: the detector's weights, and the verifier's and the
        orientation classifier's when used (a run skips an image only when all match what masked it before)."""
        info = {"name": self.name, "weights_sha256": self.weights_sha256}
        if verify and self.verifier:
            info["verifier_sha256"] = self.verifier.get("weights_sha256", "")
        if self.turned_view and self.orientation:  # it decides which photos also run turned
            info["orientation_sha256"] = self.orientation.get("weights_sha256", "")
        return info

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["architecture"] = Architecture.from_dict(d.get("architecture", {}))
        d["classes"] = tuple(d.get("classes", CLASSES))
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown keys in config.json: {sorted(unknown)}")
        return cls(**d)


class PassThroughTransform(GeneralizedRCNNTransform):
    """torchvision's transform minus resizing: callers hand over images already at the detector's size
    (``platemask.segment.prepare`` for the CLI, the DAG workers and the container; fixed-size crops in training)."""

    def __init__(self, image_mean, image_std):
        super().__init__(min_size=1, max_size=1, image_mean=image_mean, image_std=image_std, size_divisible=32)

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        """Boxes as they are (images were not resized here) and each mask left as the mask head's
        28 x 28 probabilities in its box's frame: torchvision would paste every one into a view-sized
        image (3 MB at 896 px, a Python loop per detection), when only the box's own pixels are ever
        read (``platemask.segment.box_masks`` pastes them there, the same way)."""
        return result


def mobilenet_v2_features(imagenet_weights: str | Path | None = None, trainable_from: int = 4) -> nn.Sequential:
    """MobileNetV2's ``features[:18]`` (the final 1x1 conv to 1280 channels dropped) with frozen batch
    norm and layers below ``trainable_from`` frozen; ImageNet-initialised when ``imagenet_weights`` is
    given (training only), random otherwise (what loading a trained checkpoint wants)."""
    from torchvision.models import mobilenet_v2
    from torchvision.ops import FrozenBatchNorm2d

    mnv2 = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
    if imagenet_weights is not None:
        state = torch.load(str(imagenet_weights), map_location="cpu", weights_only=True)
        missing, unexpected = mnv2.load_state_dict(state, strict=False)
        missing = [k for k in missing if "num_batches_tracked" not in k]
        if missing:
            raise ValueError(f"ImageNet weights {imagenet_weights} lack keys: {missing[:5]}")
    features = mnv2.features[:18]
    for i, layer in enumerate(features):
        if i < trainable_from:
            layer.requires_grad_(False)
    return features


def build_model(*, arch: Architecture | None = None, imagenet_weights: str | Path | None = None) -> nn.Module:
    """Assemble backbone, FPN and heads.

    ``imagenet_weights`` is a torchvision ``mobilenet_v2`` state dict (training only). Without it the
    backbone starts random, which is what loading a trained checkpoint wants.
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    arch = arch or Architecture()
    if arch.backbone != "mobilenet_v2":
        raise ValueError(f"backbone={arch.backbone!r} is not supported; use 'mobilenet_v2'")
    n_levels = len(_MNV2_RETURN) + 1  # + max-pool level
    if len(arch.anchor_sizes) != n_levels:
        raise ValueError(f"anchor_sizes has {len(arch.anchor_sizes)} levels but the FPN has {n_levels}")
    per_level = {len(s) for s in arch.anchor_sizes}
    if len(per_level) != 1:
        raise ValueError(f"anchor_sizes must give the same number of sizes per level, got {arch.anchor_sizes}")
    if not 0 <= arch.trainable_from <= 18:
        raise ValueError(f"trainable_from={arch.trainable_from} must be within 0..18")

    features = mobilenet_v2_features(imagenet_weights, arch.trainable_from)
    backbone = BackboneWithFPN(
        features,
        return_layers=_MNV2_RETURN,
        in_channels_list=_MNV2_CHANNELS,
        out_channels=arch.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(
        sizes=arch.anchor_sizes, aspect_ratios=(arch.aspect_ratios,) * n_levels
    )
    num_anchors = anchors.num_anchors_per_location()[0]
    c = arch.fpn_channels
    box_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=14, sampling_ratio=2)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, num_anchors),
        rpn_pre_nms_top_n_train=arch.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=arch.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=arch.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=arch.rpn_post_nms_top_n_test,
        rpn_fg_iou_thresh=0.6,
        rpn_bg_iou_thresh=0.3,
        rpn_batch_size_per_image=arch.rpn_batch_size_per_image,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(c * 7 * 7, arch.box_head_dim),
        box_predictor=FastRCNNPredictor(arch.box_head_dim, len(CLASSES)),
        box_score_thresh=arch.box_score_thresh,
        box_nms_thresh=arch.box_nms_thresh,
        box_detections_per_img=arch.box_detections_per_img,
        box_batch_size_per_image=arch.box_batch_size_per_image,
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(c, [arch.mask_head_channels] * arch.mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(arch.mask_head_channels, arch.mask_head_channels, len(CLASSES)),
    )
    # Resizing happens once, before the model: platemask.segment (plan_views/prepare) for the CLI, the DAG
    # workers and the container alike; training feeds fixed-size crops. torchvision's transform then
    # only normalises and batches.
    model.transform = PassThroughTransform(model.transform.image_mean, model.transform.image_std)
    return model


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: nn.Module, cfg: ModelConfig, out_dir: str | Path, *, half: bool = True) -> ModelConfig:
    """Write ``weights.pt`` (fp16 unless ``half=False``) and ``config.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    wpath = out / cfg.weights
    torch.save(state, wpath)
    cfg.weights_sha256 = sha256_file(wpath)
    (out / "config.json").write_text(cfg.to_json())
    return cfg


_SHA256 = re.compile(r"[0-9a-f]{64}")


def require_sha256(recorded: Any, path: Path, model_dir: str | Path, *, what: str, field: str, fix: str) -> str:
    """The SHA-256 ``config.json`` records for ``path``, or ValueError when there is none (missing,
    empty or not 64 hex digits): a folder whose weights cannot be checked is refused, never loaded
    unchecked (an emptied hash would let any weights file pass)."""
    if isinstance(recorded, str) and _SHA256.fullmatch(recorded):
        return recorded
    raise ValueError(
        f"{Path(model_dir) / 'config.json'} records no SHA-256 for its {what} {path} ({field} is {recorded!r}, "
        f"not 64 lowercase hex digits): the file cannot be checked, so the model folder is refused; {fix}"
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json in model directory {model_dir}: point at a folder made by 'platemask train --export' "
            "(it holds config.json and weights.pt): --model on the command line, the model Param or "
            "PLATEMASK_MODEL_DIR in a DAG, the image's /opt/ml/model in the container"
        )
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        return ModelConfig.from_dict(doc)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:  # bad JSON, unknown or mistyped fields
        raise ValueError(f"{path} cannot be read as a model config ({exc}): the model folder is damaged or was "
                         "edited by hand; re-export it ('platemask export')") from exc


def load_model(model_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Load a shipped model for inference (fp32 on CPU, fp16 weights are upcast)."""
    cfg = load_config(model_dir)
    wpath = Path(model_dir) / cfg.weights
    if not wpath.is_file():
        raise FileNotFoundError(f"model weights {wpath} are missing (config.json names {cfg.weights!r})")
    want = require_sha256(cfg.weights_sha256, wpath, model_dir, what="weights", field="weights_sha256",
                          fix="re-export the folder ('platemask export' or 'platemask train --export' write it)")
    actual = sha256_file(wpath)
    if actual != want:
        raise ValueError(
            f"weights {wpath} have SHA-256 {actual[:12]}…, config.json expects {want[:12]}…: "
            "the model folder is corrupt or mixed; re-export it"
        )
    model = build_model(arch=cfg.architecture)
    state = torch.load(str(wpath), map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state)
    model.eval().to(device)
    return model, cfg


def fuse_frozen_bn(module: nn.Module) -> nn.Module:
    """Fold every ``FrozenBatchNorm2d`` that follows a ``Conv2d`` into the conv's weights and bias.

    Inference only (the result has no batch norm left to train). Same outputs up to float rounding;
    on a CPU it halves the backbone's time, which is dominated by MobileNetV2's many cheap layers.
    """
    from torchvision.ops import FrozenBatchNorm2d

    for child in module.children():
        fuse_frozen_bn(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d)):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
            with torch.no_grad():
                fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
                base = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
                fused.bias.copy_((base - bn.running_mean) * scale + bn.bias)
            module._modules[a] = fused.to(conv.weight.device)
            module._modules[b] = nn.Identity()
    return module
