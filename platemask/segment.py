"""Segmentation: photos in, plate polygons out, in the photo's own pixel frame.

One preprocessing path (``prepare``) serves training evaluation, the CLI, the DAG workers and the
inference container, so the model sees the same pixels everywhere. A ``Segmenter`` is a callable
that always returns one list of ``Plate`` per image (empty when nothing is found, never None).
Large photos get a second, tiled pass at higher resolution so small plates are not lost; the
detections of both passes are merged conservatively (overlapping outlines are united, not dropped).
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from .detections import Plate
from .constants import DEFAULT_RUNTIME
from .geometry import failsafe_polygon, grow_polygon, intersection_over_smaller
from .model import ModelConfig, fuse_frozen_bn, load_model
from .onnx_runtime import attach_trunk, choose_runtime
from .orientation import load_orientation
from .verify import LEGACY_FUSION, fuse, load_verifier


@dataclass
class View:
    """A region of the photo (x0, y0, x1, y1) resized by ``scale`` for the detector."""

    image_index: int
    x0: int
    y0: int
    x1: int
    y1: int
    scale: float
    min_box: float = 0.0  # detections whose box long side (view pixels) is smaller are left to the finer views

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the tensor the detector sees."""
        return _scaled(self.x0, self.y0, self.x1, self.y1, self.scale)


def _scaled(x0: int, y0: int, x1: int, y1: int, scale: float) -> tuple[int, int]:
    if scale == 1.0:
        return y1 - y0, x1 - x0
    return max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))


def view_pixels(rgb: np.ndarray, x0: int, y0: int, x1: int, y1: int, scale: float) -> np.ndarray:
    """Crop and shrink (never enlarge): the HxWx3 uint8 pixels the detector sees."""
    crop = rgb[y0:y1, x0:x1]
    if scale != 1.0:
        h, w = _scaled(x0, y0, x1, y1, scale)
        crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
    out = np.ascontiguousarray(crop)
    if any(st < 0 for st in out.strides):
        # numpy takes an array with a side of 1 pixel for contiguous whatever its strides, and leaves a photo
        # turned by np.rot90 (a view) with a negative one, which torch refuses: a 1 x 2 photo on its side
        # failed its whole batch (every photo read with it: detector_error)
        out = out.copy()
    return out


def prepare(rgb: np.ndarray, x0: int, y0: int, x1: int, y1: int, scale: float,
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Crop, shrink (never enlarge) and convert to a CHW tensor in [0, 1] on ``device``. The pixels
    travel as uint8 and become floats there (a quarter of the bytes over PCIe)."""
    pixels = torch.from_numpy(view_pixels(rgb, x0, y0, x1, y1, scale))
    return pixels.to(device, non_blocking=True).permute(2, 0, 1).to(dtype).div_(255.0)


def box_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
              padding: int = 1) -> list[tuple[np.ndarray, int, int]]:
    """Each detection's mask pasted over its own box only: ``(probabilities, x, y)`` with the window's
    top-left pixel at (x, y) of the ``height`` x ``width`` view, clipped to it.

    The pixels are torchvision's ``paste_masks_in_image`` (the 28 x 28 mask padded by one pixel, its
    box grown to match, bilinear resize) without the view-sized canvas of zeros around each one;
    always in float32 (on a GPU torchvision grew fp16 boxes, which moved a window by a pixel at times)."""
    from torchvision.models.detection.roi_heads import expand_boxes

    if len(masks) == 0:
        return []
    m = masks.shape[-1]
    padded = torch.nn.functional.pad(masks.float(), (padding,) * 4)
    grown = expand_boxes(boxes.float(), (m + 2 * padding) / m).to(torch.int64).tolist()
    out = []
    for mask, (bx0, by0, bx1, by1) in zip(padded, grown):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        pasted = torch.nn.functional.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, x1 = max(bx0, 0), min(bx1 + 1, width)
        y0, y1 = max(by0, 0), min(by1 + 1, height)
        if x1 <= x0 or y1 <= y0:
            out.append((np.zeros((0, 0), np.float32), x0, y0))
            continue
        out.append((pasted[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0].numpy(), x0, y0))
    return out


def plan_views(width: int, height: int, cfg: ModelConfig, index: int = 0) -> list[View]:
    """The whole photo at ``input_max_side`` (and at ``coarse_side``), plus overlapping tiles when it is much larger."""
    side = cfg.input_max_side
    long = max(width, height)
    views = [View(index, 0, 0, width, height, min(1.0, side / long))]
    if long > cfg.tile_above * side:
        # tiles at 2x the global resolution (capped at native): a plate 4x smaller than the
        # detector can see in the global pass is still ~side/long*2 of its size here
        tscale = min(1.0, cfg.tile_above * side / long)
        tile = int(side / tscale)  # tile edge in photo pixels
        step = max(1, int(tile * (1 - cfg.tile_overlap)))
        xs = list(range(0, max(width - tile, 0) + 1, step))
        ys = list(range(0, max(height - tile, 0) + 1, step))
        if xs[-1] + tile < width:
            xs.append(width - tile)
        if ys[-1] + tile < height:
            ys.append(height - tile)
        for ty in ys:
            for tx in xs:
                views.append(View(index, tx, ty, min(tx + tile, width), min(ty + tile, height), tscale))
    if cfg.coarse_side and long > 1.25 * cfg.coarse_side:
        # a plate photographed up close is larger than the detector's anchors at input_max_side;
        # the coarse view shows it at the scale training's zoom-out taught (whole photo in one crop)
        views.append(View(index, 0, 0, width, height, cfg.coarse_side / long, min_box=0.3 * cfg.coarse_side))
    return views


def unturn(polygon: np.ndarray, height: int) -> np.ndarray:
    """A polygon found in a photo turned a quarter clockwise (``np.rot90(rgb, -1)``) in the frame of
    the photo itself, ``height`` pixels tall: the turned (x', y') is the photo's (y', height - x')."""
    return np.stack([polygon[:, 1], height - polygon[:, 0]], axis=1).astype(np.float32)


def merge_plates(plates: list[Plate], overlap: float = 0.3, into: list[Plate] = ()) -> list[Plate]:
    """Unite detections of the same plate (from overlapping views): hull of both, highest score.
    ``into``: plates already merged (kept apart from each other), that ``plates`` join or add to."""
    merged: list[Plate] = [Plate(score=m.score, polygon=m.polygon.copy()) for m in into]
    for p in sorted(plates, key=lambda p: -p.score):
        for m in merged:
            if intersection_over_smaller(grow_polygon(m.polygon, 0), grow_polygon(p.polygon, 0)) >= overlap:
                m.polygon = grow_polygon(np.concatenate([m.polygon, p.polygon]), 0)
                m.score = max(m.score, p.score)
                break
        else:
            merged.append(Plate(score=p.score, polygon=p.polygon.copy()))
    return merged


class Segmenter:
    """``segmenter(list_of_rgb_uint8) -> list[list[Plate]]`` with detections at ``min_score`` or above.

    ``min_score`` defaults to the model's ``review_low`` so QA sees near-misses, or to the run's
    ``threshold`` when that is lower (what a run masks is never dropped before it is seen); masking
    uses ``cfg.score_threshold`` (or the run's threshold) to decide what to hide.
    """

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_size: int = 4,
                 min_score: float | None = None, threads: int | None = None, verify: bool = True,
                 threshold: float | None = None, runtime: str = DEFAULT_RUNTIME):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available on this machine; use --device cpu")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model, self.cfg = load_model(model_dir, device=self.device)
        fuse_frozen_bn(self.model)
        if self.device.type == "cpu":
            # oneDNN's depthwise convolutions are much faster on NHWC (measured 2x on MobileNetV2)
            self.model.to(memory_format=torch.channels_last)
        self.model_dir = Path(model_dir)
        # the convolutional trunk on ONNX Runtime (CPU) or PyTorch; what follows it is torchvision either way
        self.runtime = choose_runtime(runtime, self.device, self.cfg.onnx)
        if self.runtime == "onnx":
            attach_trunk(self.model, self.model_dir, self.cfg.onnx["trunk"], weights_sha256=self.cfg.weights_sha256,
                         threads=threads)
        self.batch_size = max(1, int(batch_size))
        # next to a GPU the views are shrunk on the host in parallel (OpenCV lets go of the interpreter
        # lock); on a CPU the detector has the cores
        self._prepare_pool = None
        if self.device.type == "cuda":
            from concurrent.futures import ThreadPoolExecutor

            self._prepare_pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="views")
            weakref.finalize(self, self._prepare_pool.shutdown, wait=False)
        elif self.device.type == "cpu" and torch.get_num_threads() > 1:
            # torchvision's CPU RoIAlign runs on one thread: pool the boxes on every core (the model
            # then holds a thread pool: it is for inference here, not for copying or scripting)
            from concurrent.futures import ThreadPoolExecutor

            from .roi_pool import SplitRoIAlign

            parts = torch.get_num_threads()
            roi_threads = ThreadPoolExecutor(parts - 1, thread_name_prefix="roi_align")
            weakref.finalize(self, roi_threads.shutdown, wait=False)
            heads = self.model.roi_heads
            heads.box_roi_pool = SplitRoIAlign(heads.box_roi_pool, roi_threads, parts)
            heads.mask_roi_pool = SplitRoIAlign(heads.mask_roi_pool, roi_threads, parts)
        # what a run can use: its near misses (from review_low) and everything it masks, also when
        # it runs at a threshold under the model's review_low
        run_threshold = self.cfg.score_threshold if threshold is None else float(threshold)
        self.min_score = min(self.cfg.review_low, run_threshold) if min_score is None else float(min_score)
        # The model runs the mask head for every detection over its own floor (0.02, there for
        # training), up to 60 a view, and each becomes an outline. Nothing below min_score is used, and
        # dropping those first changes nothing above it (NMS and the top-k only let a higher score
        # suppress a lower one); 1 % under min_score as the model keeps scores strictly above it.
        heads = self.model.roi_heads
        heads.score_thresh = max(heads.score_thresh, 0.99 * self.min_score)
        if self.device.type == "cuda":
            self.model.half()
        self.verifier = None
        self.fusion = self.cfg.verifier.get("fusion", LEGACY_FUSION)  # checked by load_verifier
        if verify and self.cfg.verifier:
            self.verifier = load_verifier(self.model_dir, self.cfg.verifier, device=self.device, runtime=self.runtime,
                                          onnx=self.cfg.onnx.get("verifier"), threads=threads)
        # which landscape photos lie on their side and also get the turned view (portrait ones always do)
        self.orientation = None
        if self.cfg.turned_view and self.cfg.orientation:
            self.orientation = load_orientation(self.model_dir, self.cfg.orientation, device=self.device,
                                                runtime=self.runtime, onnx=self.cfg.onnx.get("orientation"), threads=threads)

    @property
    def model_info(self) -> dict:
        return self.cfg.identity(verify=self.verifier is not None)

    @torch.inference_mode()
    def _run(self, views: list[View], images: list[np.ndarray]) -> list[list[Plate]]:
        """Each view's plates. Tensors are made one batch at a time (a 79 MP photo has 8 views, 10 MB
        each as float) and each batch's outputs become polygons at once."""
        # a batch is padded to its largest member: batch views of the same shape together (a coarse
        # view next to a full-size one would otherwise cost as much as the full-size one)
        order = sorted(range(len(views)), key=lambda i: (*views[i].size, i))
        plates: list[list[Plate]] = [[] for _ in views]
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            make = lambda j: prepare(images[views[j].image_index], views[j].x0, views[j].y0,  # noqa: E731
                                     views[j].x1, views[j].y1, views[j].scale, self.device, dtype)
            chunk = list(self._prepare_pool.map(make, idx)) if self._prepare_pool else [make(j) for j in idx]
            for j, found in zip(idx, self._plates([views[j] for j in idx], self.model(chunk))):
                plates[j] = found
        return plates

    def _plates(self, views: list[View], outs: list[dict]) -> list[list[Plate]]:
        """Each view's detections at ``min_score`` or above, in the photo's pixel frame. The batch's
        scores, boxes and 28 x 28 masks come to the host in one copy each (a few hundred KB)."""
        counts = [len(o["scores"]) for o in outs]
        if not sum(counts):
            return [[] for _ in views]
        scores = torch.cat([o["scores"] for o in outs]).float().cpu()
        boxes = torch.cat([o["boxes"] for o in outs]).float().cpu()
        masks = torch.cat([o["masks"] for o in outs]).float().cpu()
        result = []
        start = 0
        for v, n in zip(views, counts):
            s, b, m = scores[start : start + n], boxes[start : start + n], masks[start : start + n]
            start += n
            keep = s >= self.min_score
            if v.min_box:
                keep &= torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= v.min_box
            s, b, m = s[keep], b[keep], m[keep]
            h, w = v.size
            found = []
            for box, score, (local, ox, oy) in zip(b.tolist(), s.tolist(), box_masks(m[:, 0], b, h, w)):
                poly = failsafe_polygon(local, box, threshold=self.cfg.mask_threshold, origin=(ox, oy))
                poly = poly / v.scale + np.array([v.x0, v.y0], np.float32)
                found.append(Plate(score=float(score), polygon=poly.astype(np.float32)))
            result.append(found)
        return result

    def __call__(self, images: list[np.ndarray]) -> list[list[Plate]]:
        return self.with_turned_view(images, self.verify_many(images, self.detect(images)))

    def on_views(self, views: list[list[np.ndarray]]) -> list[list[Plate]]:
        """Plates of each photo given as several views of the same pixels (``Decoded.detector_views``:
        the photo as shown, and its stored values where those differ): each view detected and
        verified, what any of them finds united. One view a photo costs what ``self(images)`` does."""
        found = self([v for vs in views for v in vs])
        out, i = [], 0
        for vs in views:
            plates = found[i]
            for more in found[i + 1:i + len(vs)]:
                plates = merge_plates(more, into=plates)
            out.append(plates)
            i += len(vs)
        return out

    def turned(self, images: list[np.ndarray]) -> list[int]:
        """Which photos also run turned a quarter: every portrait one (taller than wide: what a landscape
        photo lying on its side is), and the landscape ones the orientation classifier finds lying on
        their side (what a portrait photo whose EXIF Orientation was stripped is); none when the
        model's config turns the view off."""
        if not self.cfg.turned_view:
            return []
        turn = [i for i, rgb in enumerate(images) if rgb.shape[0] > rgb.shape[1]]
        if self.orientation is not None:
            wide = [i for i, rgb in enumerate(images) if rgb.shape[0] <= rgb.shape[1]]
            if wide:
                turn += [i for i, side in zip(wide, self.orientation.sideways([images[i] for i in wide])) if side]
        return sorted(turn)

    def with_turned_view(self, images: list[np.ndarray], plates: list[list[Plate]]) -> list[list[Plate]]:
        """``plates`` (verified) of each photo that :meth:`turned` picks united with those found in it
        turned a quarter clockwise (detected and verified there, mapped back): see
        ``ModelConfig.turned_view``. The other photos are left as they are."""
        chosen = self.turned(images)
        if not chosen:
            return plates
        # views, not copies: each detector view and verifier window is cut out of them as out of an
        # upright photo, and they go through the detector in batches like the upright ones
        turned = [np.rot90(images[i], -1) for i in chosen]
        out = list(plates)
        for i, found in zip(chosen, self.verify_many(turned, self.detect(turned))):
            if found:
                # joined to the upright plates, which stay apart from each other as detect left them
                out[i] = merge_plates([Plate(p.score, unturn(p.polygon, images[i].shape[0])) for p in found], into=out[i])
        return out

    def warm_up(self, width: int = 1280, height: int = 720) -> float:
        """One pass over a generated photo of ``width`` x ``height`` (noise: its results are thrown
        away), one verifier call and one orientation classifier call, so that the first real batch
        does not pay for the runtimes' first-call set-up (memory arenas, kernel choice; on the 2-core
        CPU the first batch of 4 took about 250 ms a photo against 190-210 after, and 210 after a
        warm-up of 0.27 s; CUDA's is larger). Callers run it while loading, where start-up is
        counted. Returns seconds."""
        t0 = time.perf_counter()
        rgb = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        self.detect([rgb])
        if self.verifier is not None:
            self.verifier(rgb, [[width * 0.4, height * 0.45, width * 0.6, height * 0.55]])
        if self.orientation is not None:
            self.orientation.p_sideways([rgb])
        return time.perf_counter() - t0

    def detect(self, images: list[np.ndarray]) -> list[list[Plate]]:
        """The detector's plates per image, merged across views and clipped to the photo, before the
        verifier's second look (:meth:`verify_plates`)."""
        views: list[View] = []
        for i, rgb in enumerate(images):
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ValueError(f"image {i}: expected HxWx3 uint8 RGB, got {rgb.shape} {rgb.dtype}")
            views.extend(plan_views(rgb.shape[1], rgb.shape[0], self.cfg, i))
        per_image: list[list[Plate]] = [[] for _ in images]
        for v, plates in zip(views, self._run(views, images)):  # in view order, as merge_plates saw them
            per_image[v.image_index].extend(plates)
        results = []
        for i, plates in enumerate(per_image):
            h, w = images[i].shape[:2]
            merged = merge_plates(plates)
            for p in merged:
                p.polygon[:, 0] = np.clip(p.polygon[:, 0], 0, w)
                p.polygon[:, 1] = np.clip(p.polygon[:, 1], 0, h)
            results.append(merged)
        return results

    def verify_plates(self, rgb: np.ndarray, plates: list[Plate]) -> list[Plate]:
        """The verifier's second opinion fused into each detector score; what falls under ``min_score``
        is dropped. Without a verifier the plates are returned as they are."""
        return self.verify_many([rgb], [plates])[0]

    def verify_many(self, images: list[np.ndarray], plates: list[list[Plate]]) -> list[list[Plate]]:
        """:meth:`verify_plates` for several photos, their crops in shared batches."""
        if self.verifier is None:
            return plates
        probs = self.verifier.many([(rgb, [p.box for p in found]) for rgb, found in zip(images, plates)])
        out = []
        for found, ps in zip(plates, probs):
            for p, prob in zip(found, ps):
                p.score = fuse(p.score, prob, self.fusion)
            out.append([p for p in found if p.score >= self.min_score])
        return out
