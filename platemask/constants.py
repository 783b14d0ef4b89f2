"""Facts that more than one entry point needs: the CLI, the DAG's Params, the inference server and runs.

The rule: a choice or default that two of those read lives here, once; each reads it from here
(CLI ``choices``, DAG ``Param(enum=...)``, validation in runs/pipeline/mask, the server's
defaults). A fact only one module uses stays in that module (e.g. the pixel limit in
``platemask.imageio``, the review band in ``platemask.review``). Standard library only, and torch is
imported only when "auto" has to be resolved, so the DAG file imports this at parse time for free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

# How a plate is hidden (platemask.mask). The Literal is for type checkers; the tuple is the same list.
MaskMode = Literal["gaussian", "pixelate", "solid"]
MASK_MODES: tuple[str, ...] = get_args(MaskMode)
DEFAULT_MASK_MODE: MaskMode = "gaussian"

# Which EXIF survives into the masked copy (platemask.imageio).
MetadataPolicy = Literal["strip", "safe", "keep"]
METADATA_POLICIES: tuple[str, ...] = get_args(MetadataPolicy)
DEFAULT_METADATA_POLICY: MetadataPolicy = "safe"

# Which rendered watermarks the verifier learns as negatives (platemask.training.synth; the CLI's
# train-verifier --overlay-style).
OverlayStyle = Literal["any", "plain", "light"]
OVERLAY_STYLES: tuple[str, ...] = get_args(OverlayStyle)

# Where a run's segmentation happens: on the Airflow workers, or as a SageMaker Batch Transform job.
Backend = Literal["local", "sagemaker"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_BACKEND: Backend = "local"

# What runs the detector's convolutional trunk (platemask.onnx_runtime): "auto" is ONNX Runtime on
# CPU when the model folder ships the trunk, PyTorch otherwise (GPU, or a folder without it).
Runtime = Literal["auto", "torch", "onnx"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
DEFAULT_RUNTIME: Runtime = "auto"
RUNTIME_ENV = "PLATEMASK_RUNTIME"  # the inference server's choice (the CLI has --runtime)

# The default model. One environment variable names it everywhere: the CLI's --model default, the
# DAG's Settings.model_dir (PLATEMASK_<FIELD>) and the inference server.
MODEL_DIR_ENV = "PLATEMASK_MODEL_DIR"
REPO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "platemask-mnv2-fpn"
SAGEMAKER_MODEL_DIR = "/opt/ml/model"  # where SageMaker unpacks ModelDataUrl in the container
# DescribeTransformJob states in which a job has ended (the submit/poll logic and the deferred wait's trigger)
TRANSFORM_JOB_ENDED: tuple[str, ...] = ("Completed", "Failed", "Stopped")


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when torch finds a usable GPU, else ``"cpu"``; anything else as given
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
