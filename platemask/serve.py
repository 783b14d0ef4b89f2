"""SageMaker inference server (bring-your-own container): ``python -m platemask.serve serve``.

Contract (SageMaker hosting and Batch Transform):
  GET  /ping                   200 once the model is loaded in this worker, 503 before; 503 for
                               good, with the reason, when it cannot serve (a container
                               environment it cannot use, a model that fails to load, CUDA
                               required but unusable), so a job fails on its health check
                               instead of on every request
  GET  /execution-parameters   what Batch Transform should use (concurrency, payload, strategy)
  POST /invocations            one image (image/jpeg, image/png, application/x-image) ->
                               the CLI's detection record as JSON. A photo that cannot be decoded
                               or exceeds the pixel limit is answered 200 with a ``failed`` record
                               (reason, error): Batch Transform fails the whole job on any non-2xx
                               answer, so only contract errors are non-2xx (415 wrong type, 413
                               body over the limit, 408 no byte of the body for
                               PLATEMASK_BODY_TIMEOUT_S or the body over 10 times that,
                               400 body shorter than its
                               Content-Length, 503 not ready); nothing takes the server down

Gunicorn runs ``SAGEMAKER_MODEL_SERVER_WORKERS`` workers (default: one per 2 cores, at least 1)
on ``SAGEMAKER_BIND_TO_PORT`` (default 8080); each worker loads the model from ``/opt/ml/model``
(``PLATEMASK_MODEL_DIR`` overrides) in a background thread so /ping answers at once.
``SAGEMAKER_MAX_PAYLOAD_IN_MB`` (default 6) caps request bodies, chunked ones included (read in
chunks, 413 as soon as one passes it); ``SAGEMAKER_BATCH=true`` (set by Batch Transform) lengthens
the worker timeout. ``PLATEMASK_REQUIRE_CUDA=1`` (set by the backend for GPU instance types) makes
/ping answer 503 ``cuda_unavailable`` when CUDA cannot run a kernel, so a job that paid for a GPU
fails loudly instead of running on the CPU. Each worker runs ``PLATEMASK_SERVER_THREADS`` threads
(default 8) so /ping is answered while inferences run, and decodes at most
``PLATEMASK_PIXEL_BUDGET_MB`` of pixels at once (the pipeline's default; a larger photo is decoded
alone): parallel 79 MP requests wait their turn instead of each holding its own copy.

Every environment value the server reads is checked at start-up (``read_environment``): a
threshold outside [0, 1] or not a number, a payload limit outside SageMaker's 1-100 MB, a pixel
budget under 1 MB, an unknown runtime or CUDA flag make /ping answer 503 ``bad_environment``
naming the variable, instead of 200 followed by a 500 or 413 for every request; so do gunicorn's
worker count, threads and timeout when they are no whole numbers (``server_environment``: the
server starts with their defaults and says why it will not serve, instead of exiting unheard).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import sys
import threading
import time

from flask import Flask, Response, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from .constants import DEFAULT_RUNTIME, MODEL_DIR_ENV, RUNTIME_ENV, RUNTIMES, SAGEMAKER_MODEL_DIR, resolve_device

ACCEPTED = ("image/jpeg", "image/png", "application/x-image", "image/webp", "image/tiff")
REQUIRE_CUDA_ENV = "PLATEMASK_REQUIRE_CUDA"
THRESHOLD_ENV = "PLATEMASK_THRESHOLD"
PAYLOAD_ENV = "SAGEMAKER_MAX_PAYLOAD_IN_MB"
PIXEL_BUDGET_ENV = "PLATEMASK_PIXEL_BUDGET_MB"
WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
THREADS_ENV = "PLATEMASK_SERVER_THREADS"
TIMEOUT_ENV = "SAGEMAKER_MODEL_SERVER_TIMEOUT"
BODY_TIMEOUT_ENV = "PLATEMASK_BODY_TIMEOUT_S"
DEFAULT_BODY_TIMEOUT_S = 60.0  # SageMaker's agent sends a whole body (at most 100 MB) from the same host
# the longest a whole body may take, in PLATEMASK_BODY_TIMEOUT_S: 10 min at the default (a 100 MB
# body at 170 KB/s; SageMaker's InvocationsTimeoutInSeconds defaults to 600); past it a body that
# still trickles in is cut as one that stalled is
BODY_TOTAL_FACTOR = 10
BODY_READ_CHUNK = 64 << 10  # each read a body arrives by: the stall deadline counts from the last one
DEFAULT_SERVER_THREADS = 8
DEFAULT_PAYLOAD_MB = 6.0  # SageMaker's default MaxPayloadInMB
PAYLOAD_MB_RANGE = (1, 100)  # SageMaker's MaxPayloadInMB range (its 0, "unlimited, chunked", is not supported)
_TRUE, _FALSE = ("1", "true", "yes"), ("", "0", "false", "no")
log = logging.getLogger("platemask.serve")


def _json(obj, status=200) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json")


def read_body(stream, limit: int, chunk: int = BODY_READ_CHUNK, progress=lambda: None) -> bytes:
    """The whole request body, read ``chunk`` bytes at a time (``progress()`` after each read);
    RequestEntityTooLarge (413) as soon as it passes ``limit`` bytes, having buffered at most
    ``limit + 1``. For chunked uploads (no Content-Length), which Werkzeug's ``get_data`` silently cut
    at the limit."""
    buf = bytearray()
    while True:
        part = stream.read(min(chunk, limit + 1 - len(buf)))
        if not part:
            return bytes(buf)
        progress()
        buf += part
        if len(buf) > limit:
            raise RequestEntityTooLarge()


DRAIN_CAP_BYTES = 64 << 20  # an over-limit body is read and dropped up to this, then the connection is cut


def drain(stream, cap: int, chunk: int = BODY_READ_CHUNK, progress=lambda: None) -> int:
    """Read and drop up to ``cap`` bytes of ``stream`` (never holding more than ``chunk``;
    ``progress()`` after each read)."""
    n = 0
    try:
        while n < cap:
            part = stream.read(min(chunk, cap - n))
            if not part:
                break
            progress()
            n += len(part)
    except (OSError, ValueError):  # the client went away: nothing more to read
        pass
    return n


class BodyDeadline:
    """What ``body_deadline`` yields: ``progress()`` after each read of the body; ``is_set()`` once
    the body was cut (it stalled, or took longer than its total)."""

    def __init__(self):
        self.late = threading.Event()
        self.last = time.monotonic()

    def progress(self) -> None:
        self.last = time.monotonic()

    def is_set(self) -> bool:
        return self.late.is_set()


@contextlib.contextmanager
def body_deadline(sock, seconds: float, total: float | None = None):
    """Cut the reading of a request's body short when no byte of it came for ``seconds`` (counted from
    the last ``progress()``) or it took ``total`` (default ``BODY_TOTAL_FACTOR`` times ``seconds``):
    the socket's read side is shut, so the read waiting on it ends (the answer can still be sent).
    A request whose Content-Length was larger than the body it sent (or a chunked body that never
    ended) held a server thread for good: gunicorn's worker timeout never fires while its main loop
    runs, so a few such requests took every thread and /ping timed out. A body that keeps arriving is
    not cut at ``seconds``: a 100 MB record from a slower sender is a record, not an attack. Without a
    socket (Flask's test client) nothing is cut."""
    deadline, done = BodyDeadline(), threading.Event()
    total = BODY_TOTAL_FACTOR * seconds if total is None else total
    start = deadline.last

    def watch():
        while True:
            now = time.monotonic()
            wait = min(deadline.last + seconds, start + total) - now
            if wait <= 0:
                break
            if done.wait(wait):
                return
        deadline.late.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)

    watcher = threading.Thread(target=watch, name="platemask-body-deadline", daemon=True) if sock is not None else None
    if watcher:
        watcher.start()
    try:
        yield deadline
    finally:
        done.set()


class ModelHolder:
    """Loads the segmenter once per worker, off the request path."""

    def __init__(self, model_dir: str, device: str, threads: int | None, *, require_cuda: bool = False,
                 threshold: float | None = None, runtime: str = DEFAULT_RUNTIME):
        self.model_dir, self.device, self.threads = model_dir, device, threads
        self.runtime = runtime
        self.require_cuda = require_cuda
        self.threshold = threshold  # the job's threshold (PLATEMASK_THRESHOLD); None: the model's
        self.ready = threading.Event()  # model loaded
        self.settled = threading.Event()  # loaded or failed for good: requests stop waiting
        self.env_error: str | None = None  # the container's environment cannot be used (nothing is loaded)
        self.error: str | None = None
        self.cuda_error: str | None = None
        self.segmenter = None
        self.opts = None  # the job's JobOptions (threshold, review band), built once the model is loaded
        self.lock = threading.Lock()  # one inference at a time per worker: threads only serve /ping meanwhile

    def load(self):
        try:
            self._load()
        finally:
            self.settled.set()

    def problem(self) -> tuple[str, str] | None:
        """(reason, message) when this worker cannot serve for good; None while loading or ready."""
        if self.env_error:
            return "bad_environment", self.env_error
        if self.cuda_error:
            return "cuda_unavailable", self.cuda_error
        if self.error:
            return "model_load_failed", self.error
        return None

    def _load(self):
        if self.env_error:
            log.error("the container's environment cannot be used: %s; /ping answers 503 so the transform job "
                      "fails with this reason (the model is not loaded)", self.env_error)
            return
        if self.require_cuda:
            self.cuda_error = cuda_problem(self.device)
            if self.cuda_error:
                log.error("%s=1 but %s; /ping answers 503 so the transform job fails instead of running on the CPU",
                          REQUIRE_CUDA_ENV, self.cuda_error)
                return
        try:
            from .pipeline import JobOptions
            from .segment import Segmenter

            t0 = time.perf_counter()
            self.segmenter = Segmenter(self.model_dir, device=self.device, batch_size=1, threads=self.threads,
                                       threshold=self.threshold, runtime=self.runtime)
            self.opts = JobOptions.for_model(self.segmenter.cfg, self.threshold)  # refused here, not per request
            warm = self.segmenter.warm_up()  # before /ping says 200: the first request is not the slow one
            log.info("model %s loaded in %.1f s (trunk on %s; warm-up %.1f s)", self.segmenter.cfg.name,
                     time.perf_counter() - t0, self.segmenter.runtime, warm)
            self.ready.set()
        except Exception as exc:  # noqa: BLE001 - reported by /ping and /invocations, the server stays up
            self.error = (f"cannot load the model from {self.model_dir}: {type(exc).__name__}: {exc} "
                          f"(fix the model folder, {MODEL_DIR_ENV} or the job's ModelDataUrl)")
            log.exception("model load failed; /ping answers 503 so the transform job fails with this reason")

    def start(self):
        threading.Thread(target=self.load, name="model-load", daemon=True).start()


def cuda_problem(device: str) -> str | None:
    """Why CUDA cannot run this model here (None when it can): no GPU, a driver older than the
    torch build needs, or a build without kernels for this GPU all end up here."""
    import torch

    if not device.startswith("cuda"):
        return f"the server was configured for device {device!r} (PLATEMASK_DEVICE), not cuda"
    if not torch.cuda.is_available():
        return (f"CUDA is not usable: torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none'}) finds "
                "no usable GPU (no device, no driver, or a driver older than this build needs)")
    try:
        (torch.ones(1, device=device) + 1).item()
    except RuntimeError as exc:
        return f"CUDA is not usable: a test kernel on {device} failed: {exc}"
    return None


def _require_cuda() -> bool:
    return os.environ.get(REQUIRE_CUDA_ENV, "").strip().lower() not in _FALSE  # an unknown value: required


def _number(raw: str) -> float | None:
    try:
        v = float(raw)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def read_environment(env=None, *, max_payload_mb: float | None = None) -> tuple[dict, list[str]]:
    """The values the server takes from its environment, and what is wrong with them.

    Returns (values, problems): each value is usable (a bad one is replaced by its default, so the
    server still starts and can say why it will not serve); ``problems`` names each bad variable,
    its value, why and what to set. A non-empty list makes /ping answer 503 ``bad_environment``."""
    from .pipeline import JobOptions

    env = os.environ if env is None else env
    problems: list[str] = []

    def raw(name: str) -> str:
        return str(env.get(name, "")).strip()

    threshold = None
    if raw(THRESHOLD_ENV):
        t = _number(raw(THRESHOLD_ENV))
        if t is None or not 0.0 <= t <= 1.0:
            problems.append(f"{THRESHOLD_ENV}={raw(THRESHOLD_ENV)!r} is not a number within [0, 1]: every request "
                            "would fail; set the run's threshold within [0, 1] (the backend writes it into the "
                            "job's Environment) or leave it empty for the model's operating threshold")
        else:
            threshold = t
    payload = DEFAULT_PAYLOAD_MB
    given = str(max_payload_mb) if max_payload_mb is not None else raw(PAYLOAD_ENV)
    if given:
        lo, hi = PAYLOAD_MB_RANGE
        p = _number(given)
        if p is None or not lo <= p <= hi:
            problems.append(f"{PAYLOAD_ENV}={given!r} is not a number of MB from {lo} to {hi} (SageMaker's MaxPayloadInMB "
                            "range; 0, its value for unlimited chunked payloads, is not supported): every request "
                            "would be refused 413; set the job's MaxPayloadInMB (the backend sets it for each job) "
                            "or leave it unset for 6 MB")
        else:
            payload = p
    budget = JobOptions.pixel_budget_mb
    if raw(PIXEL_BUDGET_ENV):
        b = _number(raw(PIXEL_BUDGET_ENV))
        if b is None or b != int(b) or b < 1:
            problems.append(f"{PIXEL_BUDGET_ENV}={raw(PIXEL_BUDGET_ENV)!r} is not a whole number of MB >= 1: no photo "
                            f"could be decoded; set it to the MB of decoded pixels a worker may hold (default {budget}) "
                            "or leave it unset")
        else:
            budget = int(b)
    runtime = raw(RUNTIME_ENV) or DEFAULT_RUNTIME
    if runtime not in RUNTIMES:
        problems.append(f"{RUNTIME_ENV}={runtime!r} is not one of {', '.join(RUNTIMES)}; set one of them or leave it "
                        f"unset for {DEFAULT_RUNTIME!r}")
        runtime = DEFAULT_RUNTIME
    cuda = raw(REQUIRE_CUDA_ENV).lower()
    if cuda not in _TRUE + _FALSE:
        problems.append(f"{REQUIRE_CUDA_ENV}={raw(REQUIRE_CUDA_ENV)!r} is neither on ({', '.join(_TRUE)}) nor off "
                        f"({', '.join(repr(v) for v in _FALSE)}): whether a GPU is required is unknown; set 1 for a GPU "
                        "instance (the backend does for ml.g*/ml.p*) or leave it unset")
    body_timeout = DEFAULT_BODY_TIMEOUT_S
    if raw(BODY_TIMEOUT_ENV):
        t = _number(raw(BODY_TIMEOUT_ENV))
        if t is None or t <= 0:
            problems.append(f"{BODY_TIMEOUT_ENV}={raw(BODY_TIMEOUT_ENV)!r} is not a number of seconds > 0: set how long "
                            f"a request's body may take to arrive (default {DEFAULT_BODY_TIMEOUT_S:g}) or leave it unset")
        else:
            body_timeout = t
    return {"threshold": threshold, "max_payload_mb": payload, "pixel_budget_mb": budget, "runtime": runtime,
            "require_cuda": cuda not in _FALSE, "body_timeout_s": body_timeout}, problems


def server_environment(env=None) -> tuple[dict, list[str]]:
    """Gunicorn's values from the environment (workers, threads per worker, worker timeout) and
    what is wrong with them, as ``read_environment`` does for the model's: a bad value is replaced
    by its default, so the server still starts and /ping answers 503 ``bad_environment`` naming it.
    Before, a value that was no whole number crashed the server before it listened (the job failed
    on its health check with no reason) and 0 workers left a master that never answers."""
    env = os.environ if env is None else env
    batch = str(env.get("SAGEMAKER_BATCH", "false")).strip().lower() == "true"
    problems: list[str] = []
    values: dict[str, int] = {}
    for key, name, default, minimum, what in (
            ("workers", WORKERS_ENV, max(1, (os.cpu_count() or 1) // 2), 1,
             "model server workers (each loads the model; default one per two cores)"),
            ("threads", THREADS_ENV, DEFAULT_SERVER_THREADS, 1, "threads per worker (default 8)"),
            ("timeout", TIMEOUT_ENV, 3600 if batch else 120, 0, "seconds a request may take (0: no limit)")):
        raw = str(env.get(name, "")).strip()
        v = _number(raw) if raw else None
        if raw and (v is None or v != int(v) or v < minimum):
            problems.append(f"{name}={raw!r} is not a whole number >= {minimum}: set the {what} or leave it unset")
            v = None
        values[key] = default if v is None else int(v)
    return values, problems


def _device() -> str:
    d = os.environ.get("PLATEMASK_DEVICE", "auto")
    return "cuda" if d == "auto" and _require_cuda() else resolve_device(d)


def create_app(model_dir: str | None = None, *, max_payload_mb: float | None = None, load: bool = True,
               workers: int | None = None) -> Flask:
    from .allocator import keep_triton_out, return_freed_memory_to_os

    return_freed_memory_to_os()  # before the model's threads start (platemask.allocator)
    keep_triton_out()  # before torch is imported (platemask.allocator)
    from .detections import record
    from .imageio import decode, decode_failure, decoded_nbytes
    from .pipeline import PixelBudget, build_record

    model_dir = model_dir or os.environ.get(MODEL_DIR_ENV, SAGEMAKER_MODEL_DIR)
    env, problems = read_environment(max_payload_mb=max_payload_mb)
    server, server_problems = server_environment()
    problems += server_problems
    max_payload_mb = env["max_payload_mb"]
    body_timeout = env["body_timeout_s"]
    workers = workers or server["workers"]
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    holder = ModelHolder(model_dir, _device(), threads, require_cuda=env["require_cuda"], threshold=env["threshold"],
                         runtime=env["runtime"])
    if problems:
        holder.env_error = "; ".join(problems)
    budget = PixelBudget(env["pixel_budget_mb"] * 1024 * 1024)  # decoded pixels in this worker, all requests together
    turns = itertools.count()
    turns_lock = threading.Lock()
    app = Flask("platemask")
    max_payload = int(max_payload_mb * 1024 * 1024)
    app.config["MAX_CONTENT_LENGTH"] = max_payload
    app.extensions["platemask_model"] = holder
    app.extensions["platemask_budget"] = budget
    if holder.env_error:
        holder.load()  # nothing to load: logs why and settles at once, so requests do not wait
    elif load:
        holder.start()

    @app.get("/ping")
    def ping():
        if holder.ready.is_set():
            return _json({"status": "ok", "model": holder.segmenter.model_info})
        problem = holder.problem()
        if problem:  # for good: 503 (never 200, never a 500 that reads as a passing crash)
            return _json({"status": "error", "reason": problem[0], "error": problem[1]}, 503)
        return _json({"status": "loading"}, 503)

    @app.get("/execution-parameters")
    def execution_parameters():
        return _json({"MaxConcurrentTransforms": workers, "BatchStrategy": "SINGLE_RECORD",
                      "MaxPayloadInMB": int(max_payload_mb)})

    @app.post("/invocations")
    def invocations():
        ctype = (request.mimetype or "").lower()
        if ctype not in ACCEPTED:
            return _json({"error": f"unsupported content type {ctype or '(none)'}; send one of {', '.join(ACCEPTED)}",
                          "reason": "unsupported_media_type"}, 415)
        if not (holder.settled.wait(timeout=60) and holder.ready.is_set()):
            reason, error = holder.problem() or ("not_ready", "model is still loading")
            return _json({"error": error, "reason": reason}, 503)
        if request.content_length is not None and request.content_length > max_payload:
            raise RequestEntityTooLarge()
        # gunicorn ends chunked bodies itself (wsgi.input_terminated): read them raw, in chunks
        raw = "wsgi.input_terminated" in request.environ and request.content_length is None
        with body_deadline(request.environ.get("gunicorn.socket"), body_timeout) as late:
            try:
                data = read_body(request.environ["wsgi.input"] if raw else request.stream, max_payload,
                                 progress=late.progress)
            except Exception:  # noqa: BLE001 - cut short at the deadline, or the client went away
                if not late.is_set():
                    raise
                data = None
        if data is None or late.is_set():  # gunicorn hands over the bytes that came, short, without an error
            resp = _json({"error": f"no byte of the request's body came for {body_timeout:g} s ({BODY_TIMEOUT_ENV}), or "
                                   f"the whole body took over {BODY_TOTAL_FACTOR * body_timeout:g} s: fewer bytes came "
                                   "than its Content-Length says, or a chunked body never ended; send the whole body "
                                   "with a Content-Length that matches it",
                          "reason": "body_timeout"}, 408)
            resp.headers["Connection"] = "close"
            return resp
        if request.content_length is not None and len(data) != request.content_length:  # the client gave up
            resp = _json({"error": f"the request's body ended after {len(data)} of the {request.content_length} bytes "
                                   "its Content-Length says: send the whole photo again", "reason": "body_incomplete"}, 400)
            resp.headers["Connection"] = "close"
            return resp
        key = request.headers.get("X-Platemask-Key", "")
        seg = holder.segmenter
        sha = hashlib.sha256(data).hexdigest()
        nbytes = decoded_nbytes(data)
        with turns_lock:  # turns are taken in the order they are drawn
            budget.reserve(next(turns), nbytes)
        g.platemask_reserved = nbytes  # given back by release_pixels, however this request ends
        try:
            dec = decode(data)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - this photo's failure, not the job's: 200 with a failed record
            err = decode_failure(exc)
            return _json(record(key, status="failed", reason=err.reason, error=str(err), model=seg.model_info,
                                input_sha256=sha))
        with holder.lock:
            plates = seg.on_views([dec.detector_views])[0]
        rec = build_record(key, dec, plates, holder.opts, model=seg.model_info, input_sha256=sha)
        return _json(rec)

    @app.teardown_request
    def release_pixels(_exc):
        budget.release(g.pop("platemask_reserved", 0))

    @app.errorhandler(413)
    def too_large(_exc):
        resp = _json({"error": f"request body exceeds {max_payload_mb:g} MB (SAGEMAKER_MAX_PAYLOAD_IN_MB)",
                      "reason": "payload_too_large"}, 413)
        # read (and drop) what the client is still sending, up to a cap, so it reads this answer
        # instead of a broken pipe; past the cap the connection is cut
        # (the raw input: Werkzeug's request.stream itself refuses a body over the limit)
        # (within the body's deadline: a client that announced 50 MB and sent nothing held this thread for good)
        n = request.content_length
        if n is not None or "wsgi.input_terminated" in request.environ:
            with body_deadline(request.environ.get("gunicorn.socket"), body_timeout) as late:
                drain(request.environ["wsgi.input"], DRAIN_CAP_BYTES if n is None else min(n, DRAIN_CAP_BYTES),
                      progress=late.progress)
        resp.headers["Connection"] = "close"  # do not reuse the connection
        return resp

    @app.errorhandler(405)
    def not_allowed(_exc):
        return _json({"error": "method not allowed", "reason": "method_not_allowed"}, 405)

    @app.errorhandler(404)
    def not_found(_exc):
        return _json({"error": "not found; use /ping or /invocations", "reason": "not_found"}, 404)

    @app.errorhandler(Exception)
    def crashed(exc):  # one bad request never takes the worker down
        log.exception("invocation failed")
        return _json({"error": f"{type(exc).__name__}: {exc}", "reason": "server_error"}, 500)

    return app


def _timed_thread_worker():
    """Gunicorn's gthread worker with a deadline on a request's headers (``PLATEMASK_BODY_TIMEOUT_S``,
    the body's own deadline is ``body_deadline``): a client that sent part of its headers and then
    nothing held a worker thread for good (gunicorn waits only for the first byte), and a few such
    connections took every thread, so /ping timed out and the job failed on its health check. At the
    deadline the socket's read side is shut: the parser sees the connection end and frees the thread."""
    from gunicorn.workers.gthread import ThreadWorker

    env, _ = read_environment()
    seconds = env["body_timeout_s"]

    class TimedThreadWorker(ThreadWorker):
        _pending = threading.local()

        def handle(self, conn):
            def cut():
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RD)

            timer = threading.Timer(seconds, cut)
            timer.daemon = True
            self._pending.timer = timer
            timer.start()
            try:
                return super().handle(conn)
            finally:
                timer.cancel()

        def handle_request(self, req, conn):
            timer = getattr(self._pending, "timer", None)
            if timer is not None:  # the headers are in: the app bounds the body, the inference takes its time
                timer.cancel()
            return super().handle_request(req, conn)

    return TimedThreadWorker


def gunicorn_options() -> dict:
    """Gunicorn's settings; a bad environment value gets its default here (the server starts) and is
    left in the environment, so each worker's ``create_app`` reports it (/ping 503 bad_environment)."""
    server, problems = server_environment()
    workers = server["workers"]
    return {
        "bind": f"0.0.0.0:{int(os.environ.get('SAGEMAKER_BIND_TO_PORT', 8080))}",
        "workers": workers,
        "worker_class": _timed_thread_worker(),  # gthread, with a deadline on a request's headers
        # inferences hold a thread each (one runs the model, others decode or wait their turn):
        # enough threads that /ping always finds a free one
        "threads": server["threads"],
        "timeout": server["timeout"],
        "graceful_timeout": 30,
        "keepalive": 75,  # longer than SageMaker's idle connection reuse
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": os.environ.get("PLATEMASK_LOG_LEVEL", "info"),
        "raw_env": [] if any(p.startswith(WORKERS_ENV + "=") for p in problems) else [f"{WORKERS_ENV}={workers}"],
    }


def serve() -> None:
    from gunicorn.app.base import BaseApplication

    opts = gunicorn_options()
    if opts["raw_env"]:  # a bad value stays for the workers to report
        os.environ[WORKERS_ENV] = str(opts["workers"])

    class App(BaseApplication):
        def load_config(self):
            for k, v in opts.items():
                self.cfg.set(k, v)

        def load(self):
            return create_app()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    log.info("serving on %s with %d worker(s), model %s", opts["bind"], opts["workers"],
             os.environ.get(MODEL_DIR_ENV, SAGEMAKER_MODEL_DIR))
    App().run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["serve"]:
        print("usage: python -m platemask.serve serve   (the SageMaker container contract)", file=sys.stderr)
        return 2
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
