"""A fault-injecting HTTP proxy in front of moto's S3 server, for the fault suite (tests/test_faults.py).

The DAG's S3 client is pointed at the proxy (the Airflow connection's ``endpoint_url``), so the real
botocore client, its retries and its connection pool meet real faults on the wire:

* ``("status", 503, "SlowDown")`` / ``("status", 500, "InternalError")``: an S3 error response, the
  request is not forwarded;
* ``"reset"``: the connection is reset (RST) after the request was read, before it is forwarded;
* ``"cut"``: an upload is cut mid-body: half the body is read, then the connection is reset;
* ``"short"``: a download is cut mid-body: the request is forwarded, the answer's headers (with
  the full Content-Length) and half its body are sent, then the connection is reset;
* ``"hold"``: the request waits until ``release()`` (a worker stalled mid-shard, to be SIGKILLed).

Like S3 (and unlike moto) it refuses keys over 1,024 bytes (``KeyTooLongError``).
``fault(method, bucket, key, query, headers)`` decides per request; ``first_attempt`` builds one
that faults only the first time each request is seen, so a retry of the same request passes.
"""
from __future__ import annotations

import http.client
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote, urlsplit

S3_MAX_KEY_BYTES = 1024
HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    query: str
    headers: dict[str, str]

    @property
    def op(self) -> str:
        """A rough S3 operation name: GET/PUT/HEAD/DELETE of an object, LIST of a bucket."""
        if not self.key:
            return "LIST" if self.method == "GET" else self.method + "_BUCKET"
        return self.method


def _error_body(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            "<RequestId>fault-proxy</RequestId></Error>").encode()


@dataclass
class FaultProxy:
    upstream: str
    fault: Callable[[Request], object] = lambda req: None
    seen: list[tuple[str, str, object]] = field(default_factory=list)  # (op, key, fault) of every request

    def __post_init__(self):
        u = urlsplit(self.upstream)
        self._up = (u.hostname, u.port)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._gate = threading.Event()
        self._gate.set()
        self._drop = False
        self.held = threading.Event()  # set when a request is being held
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    # ------------------------------------------------------------ control
    def hold(self) -> None:
        self._gate.clear()

    def release(self, *, drop: bool = False) -> None:
        """Let held requests go on: forwarded, or with ``drop`` reset (their client was killed)."""
        self._drop = drop
        self._gate.set()

    def close(self) -> None:
        self._closed = True
        self._gate.set()
        self._sock.close()

    def faults(self) -> int:
        return sum(f is not None for _, _, f in self.seen)

    # ------------------------------------------------------------ serving
    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        conn.close()

    @staticmethod
    def _reply(conn, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, head: bool = False):
        out = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))

    def _serve(self, conn: socket.socket):
        rfile = conn.makefile("rb")
        try:
            while True:
                line = rfile.readline(65537)
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: list[tuple[str, str]] = []
                while True:
                    h = rfile.readline(65537)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, v = h.decode("latin-1").split(":", 1)
                    headers.append((k.strip(), v.strip()))
                hd = {k.lower(): v for k, v in headers}
                if "chunked" in hd.get("transfer-encoding", "").lower():
                    raise NotImplementedError("chunked request bodies are not proxied")
                length = int(hd.get("content-length") or 0)
                path, _, query = target.partition("?")
                bucket, _, key = unquote(path).lstrip("/").partition("/")
                req = Request(method, bucket, key, query, hd)
                with self._lock:
                    fault = self.fault(req)
                    self.seen.append((req.op, key, fault))
                if hd.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if fault == "cut" and length:
                    rfile.read(length // 2)
                    self._reset(conn)
                    return
                body = rfile.read(length) if length else b""
                if fault == "hold":
                    self.held.set()
                    self._gate.wait()
                    fault = "reset" if self._drop else None
                if fault in ("reset", "cut"):
                    self._reset(conn)
                    return
                if len(key.encode()) > S3_MAX_KEY_BYTES:
                    fault = ("status", 400, "KeyTooLongError")
                if isinstance(fault, tuple):
                    _, status, code = fault
                    err = _error_body(code, f"injected by the fault proxy ({method} {key})")
                    self._reply(conn, status, code, [("Content-Type", "application/xml"),
                                                     ("Content-Length", str(len(err)))], err, head=method == "HEAD")
                    continue
                up = http.client.HTTPConnection(*self._up, timeout=60)
                try:
                    up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                    for k, v in headers:
                        if k.lower() not in HOP:
                            up.putheader(k, v)
                    up.endheaders(body if length else None)
                    resp = up.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
                    if method != "HEAD" and not any(k.lower() == "content-length" for k, _ in out):
                        out.append(("Content-Length", str(len(data))))
                    if fault == "short" and method == "GET" and len(data) > 1:
                        self._reply(conn, resp.status, resp.reason, out, data[: len(data) // 2])
                        self._reset(conn)
                        return
                    self._reply(conn, resp.status, resp.reason, out, data, head=method == "HEAD")
                finally:
                    up.close()
        except (OSError, ValueError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass


def first_attempt(predicate: Callable[[Request], bool], fault) -> Callable[[Request], object]:
    """Fault the first attempt of every request matching ``predicate``; its retry (same method, key
    and query) passes."""
    tried: set[tuple[str, str, str, str]] = set()

    def policy(req: Request):
        ident = (req.method, req.bucket, req.key, req.query)
        if not predicate(req) or ident in tried:
            return None
        tried.add(ident)
        return fault

    return policy


def always(predicate: Callable[[Request], bool], fault, times: int | None = None) -> Callable[[Request], object]:
    """Fault every request matching ``predicate`` (the first ``times`` of them, when given)."""
    n = [0]

    def policy(req: Request):
        if not predicate(req) or (times is not None and n[0] >= times):
            return None
        n[0] += 1
        return fault

    return policy
