"""The masking job: stream photos from a store, detect, mask, encode, write, account for each.

Reading/decoding and masking/encoding/writing run in bounded thread pools around the detector,
which sees batches; every input yields exactly one detection record, and an input that fails at
any stage is reported with its reason and never written to the destination.
"""
from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from .detections import Plate, record
from .geometry import polygon_area
from .imageio import DEFAULT_MAX_PIXELS, Decoded, ImageError, MetadataPolicy, content_type, decode, encode
from .mask import MaskStyle, apply_mask, masked_region
from .storage import Store

# detector(keys, decoded images) -> per image: plates (any score) or an ImageError for that image
Detector = Callable[[Sequence[str], Sequence[Decoded]], Sequence["list[Plate] | ImageError"]]


@dataclass(frozen=True)
class JobOptions:
    threshold: float = 0.5  # plates at or above are masked
    review_low: float = 0.15  # detections in [review_low, threshold) put the image on the review list
    review_high: float = 0.7  # masked plates below this also put it there
    style: MaskStyle = field(default_factory=MaskStyle)
    jpeg_quality: int = 92
    metadata: MetadataPolicy = "safe"
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 4
    read_workers: int = 8
    write_workers: int = 3

    def __post_init__(self):
        for name in ("threshold", "review_low", "review_high"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")
        if self.metadata not in ("strip", "safe", "keep"):
            raise ValueError(f"metadata must be strip, safe or keep, got {self.metadata!r}")


class Timings:
    """Thread-safe accumulated seconds per stage."""

    def __init__(self):
        self._t: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float):
        with self._lock:
            self._t[stage] = self._t.get(stage, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._t)


class Progress:
    """Count, images/s and ETA on stderr (or a logger), at most every ``every`` seconds."""

    def __init__(self, total: int | None, *, every: float = 2.0, emit: Callable[[str], None] | None = None):
        self.total, self.every, self.done, self.failed = total, every, 0, 0
        self.start = self.last = time.monotonic()
        self.emit = emit or (lambda s: print(s, file=sys.stderr, flush=True))

    def update(self, status: str):
        self.done += 1
        self.failed += status == "failed"
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            self.emit(self.line())

    def line(self) -> str:
        el = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / el
        s = f"{self.done}" + (f"/{self.total}" if self.total else "") + f" images, {rate:.2f} images/s"
        if self.total and rate > 0:
            s += f", ETA {max(self.total - self.done, 0) / rate:.0f} s"
        if self.failed:
            s += f", {self.failed} failed"
        return s


def build_record(key: str, dec: Decoded, plates: list[Plate], opts: JobOptions, *, model: dict | None,
                 input_sha256: str | None, output_sha256: str | None = None, output_key: str | None = None) -> dict:
    """The detection record for one decoded image: the same for the CLI, the DAG and the container."""
    to_mask = [p for p in plates if p.score >= opts.threshold]
    near = [p for p in plates if opts.review_low <= p.score < opts.threshold]
    why = []
    if near:
        why.append(f"{len(near)} detection(s) just below the threshold")
    if any(p.score < opts.review_high for p in to_mask):
        why.append("masked plate(s) with low confidence")
    return record(
        key, status="masked" if to_mask else "no_plate", width=dec.width, height=dec.height, plates=to_mask,
        model=model, input_sha256=input_sha256, output_sha256=output_sha256, review=bool(why),
        review_reason="; ".join(why), near_misses=[p.to_json() for p in near], output_key=output_key,
        masked_area_px=round(sum(polygon_area(masked_region(p, opts.style)[0]) for p in to_mask), 1),
    )


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _prefetch(fn, items: Iterable, pool: ThreadPoolExecutor, depth: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, with at most ``depth`` calls in flight."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class _Loaded:
    key: str
    sha: str | None = None
    dec: Decoded | None = None
    error: ImageError | None = None


def run_job(src: Store, dst: Store, keys: Sequence[str], detect: Detector, opts: JobOptions, *,
            model: dict | None = None, on_record: Callable[[dict], None] | None = None,
            progress: Progress | None = None, timings: Timings | None = None,
            dst_key: Callable[[str], str] = lambda k: k) -> list[dict]:
    """Mask ``keys`` from ``src`` into ``dst``; returns one record per key, in input order."""
    timings = timings or Timings()
    records: dict[str, dict] = {}
    lock = threading.Lock()

    def emit(rec: dict):
        with lock:
            records[rec["key"]] = rec
        if on_record:
            on_record(rec)
        if progress:
            progress.update(rec["status"])

    def load(key: str) -> _Loaded:
        t0 = time.perf_counter()
        try:
            data = src.read(key)
        except ImageError as exc:  # the store's own verdict on this input (e.g. source_changed), reason kept
            return _Loaded(key, error=exc)
        except Exception as exc:  # noqa: BLE001 - any storage error fails this image only, with its reason
            return _Loaded(key, error=ImageError("read_error", f"cannot read {src.describe(key)}: {exc}"))
        finally:
            timings.add("read", time.perf_counter() - t0)
        t1 = time.perf_counter()
        try:
            return _Loaded(key, _sha256(data), decode(data, max_pixels=opts.max_pixels))
        except ImageError as exc:
            return _Loaded(key, _sha256(data), error=exc)
        finally:
            timings.add("decode", time.perf_counter() - t1)

    def fail(item: _Loaded, err: ImageError, **kw):
        emit(record(item.key, status="failed", error=f"{src.describe(item.key)}: {err}", reason=err.reason,
                    model=model, input_sha256=item.sha, **kw))

    def finish(item: _Loaded, plates: list[Plate]):
        dec = item.dec
        try:
            to_mask = [p for p in plates if p.score >= opts.threshold]
            t0 = time.perf_counter()
            pixels = apply_mask(dec.pixels, to_mask, opts.style)
            timings.add("mask", time.perf_counter() - t0)
            t1 = time.perf_counter()
            data = encode(dec, pixels, jpeg_quality=opts.jpeg_quality, metadata=opts.metadata)
            timings.add("encode", time.perf_counter() - t1)
            t2 = time.perf_counter()
            out_key = dst_key(item.key)
            dst.write(out_key, data, content_type(dec.format))
            timings.add("write", time.perf_counter() - t2)
        except ImageError as exc:
            return fail(item, exc, width=dec.width, height=dec.height)
        except Exception as exc:  # noqa: BLE001 - a write or encode failure fails this image only
            return fail(item, ImageError("write_error", f"cannot mask or write {dst.describe(dst_key(item.key))}: "
                                         f"{type(exc).__name__}: {exc}"), width=dec.width, height=dec.height)
        emit(build_record(item.key, dec, plates, opts, model=model, input_sha256=item.sha,
                          output_sha256=_sha256(data), output_key=dst.describe(out_key)))

    with ThreadPoolExecutor(opts.read_workers, thread_name_prefix="read") as readers, \
            ThreadPoolExecutor(opts.write_workers, thread_name_prefix="write") as writers:
        pending: deque[Future] = deque()
        batch: list[_Loaded] = []

        def flush():
            if not batch:
                return
            t0 = time.perf_counter()
            try:
                results = detect([b.key for b in batch], [b.dec for b in batch])
            except ImageError as exc:
                results = [exc] * len(batch)
            except Exception as exc:  # noqa: BLE001 - fail closed: the batch is reported, never published
                results = [ImageError("detector_error", f"{type(exc).__name__}: {exc}")] * len(batch)
            timings.add("segment", time.perf_counter() - t0)
            for item, res in zip(batch, results):
                if isinstance(res, ImageError):
                    fail(item, res, width=item.dec.width, height=item.dec.height)
                else:
                    pending.append(writers.submit(finish, item, list(res)))
            batch.clear()
            while len(pending) > 2 * opts.write_workers:
                pending.popleft().result()

        for item in _prefetch(load, keys, readers, depth=max(2 * opts.batch_size, opts.read_workers)):
            if item.error is not None:
                fail(item, item.error)
                continue
            batch.append(item)
            if len(batch) >= opts.batch_size:
                flush()
        flush()
        for f in pending:
            f.result()
    return [records[k] for k in keys]
