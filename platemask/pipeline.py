"""The masking job: stream photos from a store, detect, mask, encode, write, account for each.

Reading/decoding and masking/encoding/writing run in bounded thread pools around the detector,
which sees batches; every input yields exactly one detection record, and an input that fails at
any stage is reported with its reason and never written to the destination.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from .allocator import return_freed_memory_to_os
from .constants import DEFAULT_METADATA_POLICY, METADATA_POLICIES
from .detections import Plate, record
from .geometry import polygon_area
from .imageio import (DEFAULT_MAX_PIXELS, Decoded, ImageError, MetadataPolicy, check_max_pixels, content_type, decode,
                      decode_failure, decoded_nbytes, encode, max_file_bytes)
from .mask import MaskStyle, apply_mask, masked_region
from .review import MAX_MASKED_FRACTION, MAX_PLATES, calibrate, review_band, review_reasons
from .storage import Store, normalise_key

# detector(keys, decoded images) -> per image: plates (any score) or an ImageError for that image
Detector = Callable[[Sequence[str], Sequence[Decoded]], Sequence["list[Plate] | ImageError"]]


# Threshold limits (one home; the CLI, the DAG's Params and the container read them from here).
HARD_MASK_SCORE = 0.9  # a detection scoring at least this is always masked, whatever the threshold
UNSAFE_THRESHOLD_MARGIN = 0.1  # thresholds above the model's operating threshold + this need an explicit opt-in

# A job next to a GPU (JobOptions.for_device)
GPU_BATCHES_IN_FLIGHT = 4  # decoded pixels in flight: room for this many batches of 1280 x 720 photos
HD_PHOTO_BYTES = 1280 * 720 * 3
GPU_SWITCH_INTERVAL_MS = 0.5
GPU_BUDGET_MEMORY_SHARE = 0.125  # the automatic budget's cap: this share of the memory the process may use


def memory_limit_bytes() -> int:
    """The memory this process may use: the machine's RAM, or its cgroup's limit when lower (a container)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else 8 << 30


def check_threshold(threshold: float | None, operating: float, *, unsafe: bool = False) -> None:
    """Refuse (ValueError naming the fix) a threshold above the model's operating threshold plus
    ``UNSAFE_THRESHOLD_MARGIN`` unless ``unsafe``: it would publish plates the model found as unmasked."""
    if threshold is None or unsafe:
        return
    limit = operating + UNSAFE_THRESHOLD_MARGIN
    if threshold > limit + 1e-9:
        raise ValueError(
            f"threshold {threshold:g} is above the model's operating threshold {operating:g} "
            f"+ {UNSAFE_THRESHOLD_MARGIN:g}: "
            f"plates scored between {limit:g} and {threshold:g} would be published unmasked (detections >= "
            f"{HARD_MASK_SCORE:g} are always masked). Use a threshold <= {limit:g}, or opt in explicitly "
            "(--unsafe-threshold; the DAG Param unsafe_threshold)")


def plates_to_mask(plates: Sequence[Plate], threshold: float) -> list[Plate]:
    """The plates to hide: at or above ``threshold``, and always those scoring >= ``HARD_MASK_SCORE``."""
    return [p for p in plates if p.score >= min(threshold, HARD_MASK_SCORE)]


@dataclass(frozen=True)
class JobOptions:
    threshold: float = 0.5  # plates at or above are masked
    review_low: float = 0.15  # detections in [review_low, threshold) put the image on the review list
    review_high: float = 0.7  # masked plates below this also put it there
    review_max_masks: int = MAX_PLATES  # more masks than this put it there (an unusual result)
    review_max_masked_fraction: float = MAX_MASKED_FRACTION  # and masks over this share of the photo
    style: MaskStyle = field(default_factory=MaskStyle)
    jpeg_quality: int = 92
    metadata: MetadataPolicy = DEFAULT_METADATA_POLICY
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 4
    read_workers: int = 8
    write_workers: int = 3
    calibration: tuple = ()  # the model's isotonic score -> P(plate) map (platemask.review.calibrate)

    @staticmethod
    def for_device(device: str, readers: int | None = None, batch_size: int = 4) -> dict[str, Any]:
        """The threading and memory options of a job on ``device`` (one rule for the CLI and the DAG's
        workers). Readers: ``readers`` when given, with half as many writers (at least 2); otherwise
        the defaults on a CPU (the detector wants the cores) and 8 + 4 next to a GPU, where photos
        must be decoded and encoded at the GPU's pace (more threads slowed a GPU run: each takes
        the interpreter lock the detector's own Python needs). Next to a GPU also:

        - ``pixel_budget_mb`` for ``GPU_BATCHES_IN_FLIGHT`` batches of 1280 x 720 photos (at least
          the default), and at most ``GPU_BUDGET_MEMORY_SHARE`` of the memory the process may use
          (peak memory is 2-3x the budget): with room for one batch only, the readers wait while
          the GPU works on it and the writers finish it, and nothing overlaps;
        - ``switch_interval_ms`` ``GPU_SWITCH_INTERVAL_MS``: a thread that lets go of the interpreter
          lock (every decode, encode and torch call does) waits up to the switch interval to get it
          back while another runs Python; Python's 5 ms made each of those calls cost milliseconds.
        """
        gpu = str(device).startswith("cuda")
        readers = readers or (8 if gpu else None)
        threads = {"read_workers": max(1, readers), "write_workers": max(2, readers // 2)} if readers else {}
        if not gpu:
            return threads
        budget = math.ceil(GPU_BATCHES_IN_FLIGHT * max(1, batch_size) * HD_PHOTO_BYTES / 2**20)
        # peak memory is ~2-3x the budget: never more than a share of what this process may use
        budget = min(budget, int(memory_limit_bytes() * GPU_BUDGET_MEMORY_SHARE) // 2**20)
        return {**threads, "pixel_budget_mb": max(JobOptions.pixel_budget_mb, budget),
                "switch_interval_ms": GPU_SWITCH_INTERVAL_MS}

    @classmethod
    def for_model(cls, cfg, threshold: float | None = None, **kw) -> "JobOptions":
        """Options for a model's ``config.json`` at ``threshold`` (default: its operating threshold):
        the review band and the calibration come from the model (one rule: platemask.review)."""
        t = cfg.score_threshold if threshold is None else threshold
        band = review_band(t, cfg.review_low, cfg.review_high, cfg.review_max_masks, cfg.review_max_masked_fraction)
        return cls(threshold=t, review_low=band.low, review_high=band.high, review_max_masks=band.max_masks,
                   review_max_masked_fraction=band.max_masked_fraction,
                   calibration=tuple(tuple(k) for k in cfg.calibration), **kw)

    # decoded pixels in flight, all stages together (MB; one 79 MP RGB photo is 237 MB). Peak memory
    # is about the floor torch and the model set (~1.1 GB) plus 2-3x this (Pillow's own copy of a
    # photo while decoding and encoding it): 2.3-3.0 GB for 12 x 79 MP photos (bench/bench_memory.py)
    pixel_budget_mb: int = 512
    # the interpreter's switch interval while the job runs (sys.setswitchinterval, restored after);
    # None leaves it as it is (Python's default is 5 ms). See for_device.
    switch_interval_ms: float | None = None
    # a failed input's output key is cleared of what an earlier run wrote there, so that the output
    # folder never holds a masked copy of a photo whose record says failed (the CLI; the DAG's runs
    # keep their own audit records and result identities)
    remove_stale_outputs: bool = False

    def __post_init__(self):
        for name in ("threshold", "review_low", "review_high"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")
        if self.metadata not in METADATA_POLICIES:
            raise ValueError(f"metadata must be one of {METADATA_POLICIES}, got {self.metadata!r}")
        check_max_pixels(self.max_pixels)
        if self.pixel_budget_mb < 1:
            raise ValueError(f"pixel_budget_mb must be >= 1, got {self.pixel_budget_mb}")
        if self.switch_interval_ms is not None and not 0 < self.switch_interval_ms <= 1000:
            raise ValueError(f"switch_interval_ms must be within (0, 1000], got {self.switch_interval_ms}")


class PixelBudget:
    """Bytes of decoded pixels in flight, shared by a job's stages (thread-safe).

    A photo reserves its decoded size (from its header) before it is decoded and releases it once
    its record is emitted. Reservations are granted in input order (``ticket`` 0, 1, 2, ...: every
    ticket is presented exactly once, with 0 bytes for a photo that will not be decoded), so a
    photo waiting for room waits only on photos before it, which the job can always finish: the
    job flushes a partial batch to the detector when ``blocked``. A photo larger than the whole
    budget proceeds alone, once nothing else is held. ``high_water`` is the most ever held.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.holders = 0
        self.high_water = 0
        self._next = 0
        self._blocked = False
        self._closed = False
        self._cond = threading.Condition()

    def reserve(self, ticket: int, nbytes: int) -> None:
        """Wait for ``ticket``'s turn and for room for ``nbytes``, then hold them (0: just pass the turn)."""
        with self._cond:
            while ticket != self._next or (nbytes and self.holders and self.in_use + nbytes > self.capacity):
                if self._closed:
                    raise RuntimeError("the job stopped: no memory will be released for this photo")
                if ticket == self._next:  # only the head of the line waits for room (the others, for their turn)
                    self._blocked = True
                self._cond.wait()
            self._blocked = False
            self._next += 1
            if nbytes:
                self.in_use += nbytes
                self.holders += 1
                self.high_water = max(self.high_water, self.in_use)
            self._cond.notify_all()

    def release(self, nbytes: int) -> None:
        if not nbytes:
            return
        with self._cond:
            self.in_use -= nbytes
            self.holders -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """The job stopped (an exception): wake every waiting reader instead of leaving it waiting forever."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def blocked(self) -> bool:
        """Whether the next photo in line waits for room (the job should flush what it holds)."""
        with self._cond:
            return self._blocked


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
    """Count, images/s and ETA on stderr (or a logger), at most every ``every`` seconds (thread-safe)."""

    def __init__(self, total: int | None, *, every: float = 2.0, emit: Callable[[str], None] | None = None):
        self.total, self.every, self.done, self.failed = total, every, 0, 0
        self.start = self.last = time.monotonic()
        self.emit = emit or (lambda s: print(s, file=sys.stderr, flush=True))
        self._lock = threading.Lock()

    def update(self, status: str):
        with self._lock:
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
    to_mask = plates_to_mask(plates, opts.threshold)
    effective = min(opts.threshold, HARD_MASK_SCORE)
    band = review_band(effective, opts.review_low, opts.review_high, opts.review_max_masks,
                       opts.review_max_masked_fraction)
    near = [p for p in plates if band.low <= p.score < effective]
    area = sum(polygon_area(masked_region(p, opts.style)[0]) for p in to_mask)
    why = review_reasons([p.score for p in plates], band, masked_fraction=area / max(dec.width * dec.height, 1))
    rec = record(
        key, status="masked" if to_mask else "no_plate", width=dec.width, height=dec.height, plates=to_mask,
        model=model, input_sha256=input_sha256, output_sha256=output_sha256, review=bool(why),
        review_reason="; ".join(why), near_misses=[p.to_json() for p in near], output_key=output_key,
        masked_area_px=round(area, 1),
        threshold=opts.threshold,  # which split this is (the SageMaker backend checks the container's is the run's)
        **({"frames_dropped": dec.frames_dropped,
            "note": f"multi-picture JPEG (MPO): the first frame was masked and written as a plain JPEG; "
                    f"{dec.frames_dropped} other frame(s) (previews, depth maps) were dropped"}
           if dec.frames_dropped else {}),
    )
    if opts.calibration:  # the probability that each detection is a plate, for reviewers
        for p in rec["plates"] + rec["near_misses"]:
            p["p_plate"] = calibrate(p["score"], opts.calibration)
    return rec


IO_THREAD_NICE = 19


def yield_cpu_to_model(nice: int = IO_THREAD_NICE) -> None:
    """Lower the calling thread's CPU priority (Linux: a thread's own nice value).

    The detector runs its parallel regions on every core; a decode or encode thread that takes a
    core in the middle of one stalls the whole region until it yields (each region waits for its
    slowest thread). At a lower priority the reading and writing threads run in the detector's
    single-threaded stretches instead (NMS, polygons, Python), where a core is free anyway.
    Measured by ``bench/bench_mask.py``. Elsewhere (no per-thread nice) this does nothing.
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id") or sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except OSError:
        pass


@contextmanager
def switch_interval(ms: float | None) -> Iterator[None]:
    """The interpreter's switch interval set to ``ms`` for the block, restored after (None: unchanged)."""
    if ms is None:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(ms / 1000)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _prefetch(fn, items: Iterable, pool: ThreadPoolExecutor, depth: int,
              stalled: Callable[[], None] | None = None) -> Iterator[Any]:
    """``map(fn, items)`` in order, with at most ``depth`` calls in flight; ``stalled`` is called
    every 50 ms while the next result is not ready."""
    pending: deque[Future] = deque()

    def take():
        f = pending.popleft()
        while stalled is not None and not wait([f], timeout=0.05).done:
            stalled()
        return f.result()

    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield take()
    while pending:
        yield take()


def _output_keys(keys: Sequence[str],
                 dst_key: Callable[[str], str]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Each key's output key, and the keys refused with (reason, message): an unsafe output key,
    or one output claimed by several inputs (all of them are refused, each naming the others)."""
    out: dict[str, str] = {}
    refused: dict[str, tuple[str, str]] = {}
    claimed: dict[str, list[str]] = {}
    for k in keys:
        try:
            out[k] = dst_key(k)
        except ValueError as exc:
            refused[k] = ("unsafe_key", f"{exc}; rename the object so that its path stays inside the destination")
            continue
        claimed.setdefault(out[k], []).append(k)
    for o, ks in claimed.items():
        if len(ks) > 1:
            for i, k in enumerate(ks):
                others = ", ".join(repr(x) for j, x in enumerate(ks) if j != i)
                refused[k] = ("output_collision", f"writes the same output {o!r} as {others}; neither is written "
                              "(rename one of them so their paths differ after removing '..', '.' and '//')")
    return out, refused


def remove_stale_output(dst: Store, key: str) -> dict:
    """Delete what an earlier run wrote at ``key`` for an input that failed now; the record's note."""
    try:
        if not dst.exists(key):
            return {}
        dst.delete(key)
        return {"stale_output_removed": dst.describe(key)}
    except Exception as exc:  # noqa: BLE001 - reported in the record, the input fails either way
        return {"stale_output_not_removed": f"{dst.describe(key)}: {type(exc).__name__}: {exc}"}


def _size_or_none(src: Store, key: str) -> int | None:
    """The input's size when its store tells it without reading it (a local folder), else None
    (whatever stops the size, a missing file or a link out of the folder, ``read`` reports)."""
    size = getattr(src, "size", None)
    if size is None:
        return None
    try:
        return size(key)
    except (OSError, ValueError):
        return None


@dataclass
class _Loaded:
    key: str
    sha: str | None = None
    dec: Decoded | None = None
    error: ImageError | None = None
    reserved: int = 0  # bytes held in the job's PixelBudget until this photo's record is emitted


def run_job(src: Store, dst: Store, keys: Sequence[str], detect: Detector, opts: JobOptions, *,
            model: dict | None = None, on_record: Callable[[dict], None] | None = None,
            progress: Progress | None = None, timings: Timings | None = None,
            dst_key: Callable[[str], str] = normalise_key, budget: PixelBudget | None = None) -> list[dict]:
    """Mask ``keys`` from ``src`` into ``dst``; returns one record per key, in input order.

    ``dst_key`` maps an input key to its output key (by default the same path, normalised). An input
    whose output key is unsafe (ValueError from ``dst_key``), or shared with another input, fails
    before anything is read or written: nothing is overwritten and each one has its record.
    ``on_record`` and ``progress`` are called one record at a time (never concurrently), so a
    callback may append to one file without a lock of its own. Decoded photos in flight are
    bounded by ``budget`` (by default ``opts.pixel_budget_mb``; pass one to watch its high-water mark).
    """
    timings = timings or Timings()
    budget = budget or PixelBudget(opts.pixel_budget_mb * 1024 * 1024)
    return_freed_memory_to_os()
    records: dict[str, dict] = {}
    lock = threading.Lock()
    out_keys, refused = _output_keys(keys, dst_key)
    max_bytes = max_file_bytes(opts.max_pixels)

    def emit(rec: dict):
        # Records come from the main thread and from every writer thread: one at a time, so that
        # ``on_record`` (which may append to one shared file) and the progress counter never race.
        with lock:
            records[rec["key"]] = rec
            if on_record:
                on_record(rec)
            if progress:
                progress.update(rec["status"])

    def load(job: tuple[int, str]) -> _Loaded:
        ticket, key = job
        reserved = False
        try:
            t0 = time.perf_counter()
            try:
                size = _size_or_none(src, key)
                if size is not None and size > max_bytes:  # a video or disk image: not read whole into memory
                    return _Loaded(key, error=ImageError(
                        "too_large", f"{size:,} bytes, more than any image of at most {opts.max_pixels:,} pixels "
                        f"takes ({max_bytes:,}): not read; move it out of the source, or, if it is a real photo, "
                        "downscale it or mask it with the CLI's --max-pixels raised"))
                data = src.read(key)
            except ImageError as exc:  # the store's own verdict on this input (e.g. source_changed), reason kept
                return _Loaded(key, error=exc)
            except Exception as exc:  # noqa: BLE001 - any storage error fails this image only, with its reason
                return _Loaded(key, error=ImageError("read_error", f"cannot read {src.describe(key)}: {exc}"))
            finally:
                timings.add("read", time.perf_counter() - t0)
            item = _Loaded(key, _sha256(data), reserved=decoded_nbytes(data, max_pixels=opts.max_pixels))
            t_wait = time.perf_counter()
            budget.reserve(ticket, item.reserved)  # before decoding: the header gave the size
            reserved = True
            timings.add("memory_wait", time.perf_counter() - t_wait)
            t1 = time.perf_counter()
            try:
                item.dec = decode(data, max_pixels=opts.max_pixels)
            except ImageError as exc:
                item.error = exc
                release(item)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a decoder's surprise is this photo's failure, not the shard's
                item.error = decode_failure(exc)
                release(item)
            finally:
                timings.add("decode", time.perf_counter() - t1)
            return item
        finally:
            if not reserved:  # every ticket is presented once, or the photos after it would wait forever
                budget.reserve(ticket, 0)

    def release(item: _Loaded):
        budget.release(item.reserved)
        item.reserved = 0

    def fail(item: _Loaded, err: ImageError, **kw):
        try:
            if opts.remove_stale_outputs and item.key in out_keys:
                kw.update(remove_stale_output(dst, out_keys[item.key]))
            emit(record(item.key, status="failed", error=f"{src.describe(item.key)}: {err}", reason=err.reason,
                        model=model, input_sha256=item.sha, **kw))
        finally:
            release(item)

    def finish(item: _Loaded, plates: list[Plate]):
        try:
            _finish(item, plates)
        finally:
            item.dec = None  # the photo's pixels go with its reservation
            release(item)

    def _finish(item: _Loaded, plates: list[Plate]):
        dec = item.dec
        try:
            to_mask = plates_to_mask(plates, opts.threshold)
            t0 = time.perf_counter()
            # in place: detection is done, nothing reads the original pixels again
            pixels = apply_mask(dec.pixels, to_mask, opts.style, copy=False)
            timings.add("mask", time.perf_counter() - t0)
            t1 = time.perf_counter()
            data = encode(dec, pixels, jpeg_quality=opts.jpeg_quality, metadata=opts.metadata)
            timings.add("encode", time.perf_counter() - t1)
            t2 = time.perf_counter()
            out_key = out_keys[item.key]
            dst.write(out_key, data, content_type(dec.format))
            timings.add("write", time.perf_counter() - t2)
        except ImageError as exc:
            return fail(item, exc, width=dec.width, height=dec.height)
        except Exception as exc:  # noqa: BLE001 - a write or encode failure fails this image only
            return fail(item, ImageError("write_error", f"cannot mask or write {dst.describe(out_keys[item.key])}: "
                                         f"{type(exc).__name__}: {exc}"), width=dec.width, height=dec.height)
        emit(build_record(item.key, dec, plates, opts, model=model, input_sha256=item.sha,
                          output_sha256=_sha256(data), output_key=dst.describe(out_key)))

    with switch_interval(opts.switch_interval_ms), \
            ThreadPoolExecutor(opts.read_workers, thread_name_prefix="read", initializer=yield_cpu_to_model) as readers, \
            ThreadPoolExecutor(opts.write_workers, thread_name_prefix="write", initializer=yield_cpu_to_model) as writers:
        pending: deque[Future] = deque()
        batch: list[_Loaded] = []
        flushing = [0.0]  # seconds spent in flush (also when called while waiting for the next photo)

        def flush():
            if not batch:
                return
            t0 = time.perf_counter()
            try:
                _flush()
            finally:
                flushing[0] += time.perf_counter() - t0

        def _flush():
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
            # writes in flight are bounded by the pixel budget; this only keeps the list short. Two
            # batches' worth: the detector starts the next batch while the writers finish this one
            # (waiting until 2 x write_workers were left held a GPU idle for most of a 64-photo batch)
            t_out = time.perf_counter()
            while len(pending) > max(2 * opts.write_workers, 2 * opts.batch_size):
                pending.popleft().result()
            timings.add("output_wait", time.perf_counter() - t_out)  # the detector waiting for the writers

        def stalled():
            # the next photo waits for memory held by the batch being gathered: detect what we have
            if batch and budget.blocked:
                flush()

        try:
            for key, (reason, message) in refused.items():
                # a refused input (colliding output) loses what an earlier run wrote at its output too
                stale = (remove_stale_output(dst, out_keys[key])
                         if opts.remove_stale_outputs and key in out_keys else {})
                emit(record(key, status="failed", error=f"{src.describe(key)}: {message}", reason=reason, model=model,
                            **stale))
            todo = list(enumerate(k for k in keys if k not in refused))
            loaded = iter(_prefetch(load, todo, readers, depth=max(2 * opts.batch_size, opts.read_workers), stalled=stalled))
            while True:
                # how long the detector's thread waits for the next decoded photo ("input_wait"): the
                # part of the pipeline's overhead that reading and decoding failed to hide
                t_in, f_in = time.perf_counter(), flushing[0]
                item = next(loaded, None)
                timings.add("input_wait", time.perf_counter() - t_in - (flushing[0] - f_in))
                if item is None:
                    break
                if item.error is not None:
                    fail(item, item.error)
                    continue
                batch.append(item)
                if len(batch) >= opts.batch_size:
                    flush()
            flush()
            for f in pending:
                f.result()
        except BaseException:
            budget.close()  # readers waiting for memory stop, so the pools can shut down
            readers.shutdown(cancel_futures=True)
            raise
    return [records[k] for k in keys]
