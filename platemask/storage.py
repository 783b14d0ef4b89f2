"""Where photos come from and go to: a local folder or an S3 prefix, behind one small interface.

This is the storage layer: the nightly path (``runs``, ``sagemaker_backend``, the QA index, report
and view) reaches S3 objects only through ``S3Store`` and the helpers below (JSON documents and
JSON lines, conditional writes for the run lock, listings), so another backend is this one file
(``tests/test_layout.py`` checks that no other module calls the S3 object APIs).

Keys are always relative to the store's root and use '/' separators. Writes are atomic (local:
temp file + rename; S3: single PUT), so a reader never sees half an image. Local files are written
with the permissions the process's umask gives any new file (not the temp file's 0600).

``normalise_key`` and ``overlap`` are the guards that keep originals untouched: an output key has
no empty, '.' or '..' segments and cannot climb out of its destination, and a source and a
destination that are the same place, or nested one in the other, are refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import urlparse


class Store(Protocol):
    uri: str

    def iter_keys(self) -> Iterator[str]: ...
    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def exists(self, key: str) -> bool: ...
    def describe(self, key: str) -> str: ...


def _umask() -> int:
    """The process's umask, read without changing it (os.umask must set one to read one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


class LocalStore:
    def __init__(self, root: str | Path, *, create: bool = False):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)
        self.file_mode = 0o666 & ~_umask()  # what open() would give a new file
        self.linked_folders: list[str] = []  # links to folders the last iter_keys passed over
        # folders the last iter_keys could not list (keys ending in '/', "./" for the root), with the error
        self.unreadable_folders: list[tuple[str, OSError]] = []

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents and p != self.root.resolve():
            raise ValueError(f"key {key!r} escapes {self.root}")
        return p

    def _link_path(self, key: str) -> Path:
        """Where ``key`` is, its last component not resolved: a link there is the link itself, so a
        write replaces it and a delete removes it, never what it leads to (a dedupe tool's a.jpg ->
        b.jpg in DST: a's masked copy overwrote b.jpg, and removing a's stale copy deleted b.jpg).
        A link among its folders is refused (ValueError): x -> y sent x/a.jpg's copy over y/a.jpg's."""
        p = self.root / key
        if p.name in ("", ".", "..") or key.endswith("/"):
            raise ValueError(f"key {key!r} names no file in {self.root}")
        folder = posixpath.dirname(key) or "."
        parent = self._path(folder)
        if parent != Path(os.path.normpath(self.root.resolve() / folder)):
            # a folder on the way is a link (DST's x -> y): x/a.jpg's masked copy went over y/a.jpg's
            raise ValueError(f"a folder on the way to {self.root / key} is a link (it leads to {parent}); "
                             "photos are never written or removed through a link: remove the link and run again")
        return parent / p.name

    def iter_keys(self) -> Iterator[str]:
        """Every file under the folder, in order. Links to folders are not followed (the folder is
        the boundary, as for links to files, which ``read`` refuses when they lead out of it); the
        ones passed over are in ``linked_folders`` afterwards, for the caller to name, and the folders
        that could not be listed (permission denied, an I/O error) in ``unreadable_folders``."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder {self.root} does not exist")
        self.linked_folders = []
        self.unreadable_folders = []

        def unreadable(exc: OSError) -> None:  # os.walk passed these over without a word
            where = Path(os.path.relpath(exc.filename, self.root)).as_posix() if exc.filename else "."
            self.unreadable_folders.append((where + "/", exc))

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=unreadable):
            dirnames.sort()
            self.linked_folders.extend((Path(dirpath) / d).relative_to(self.root).as_posix()
                                       for d in dirnames if (Path(dirpath) / d).is_symlink())
            for f in sorted(filenames):
                yield (Path(dirpath) / f).relative_to(self.root).as_posix()

    def read(self, key: str) -> bytes:
        p = self._path(key)
        # a named pipe, socket or device is never opened: opening a device acts (a watchdog arms, a
        # tape rewinds). Checked first, then opened without waiting and without following a link
        # (``p`` is resolved: a link there now was swapped in since), and checked again once open
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{p} is not a regular file (a named pipe, socket or device); only files are masked, "
                          "and it was not opened")
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                raise OSError(f"{p} was replaced while it was opened (by something not a regular file or "
                              "another file); run again")
            return f.read()

    def size(self, key: str) -> int:
        """The file's size in bytes (of what a link inside the folder leads to), without reading it."""
        return self._path(key).stat().st_size

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        p = self._link_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        # the suffix keeps a half-written file's type visible; a long one (a name "car.<240 characters>")
        # made the temporary name longer than the 255 bytes a file name may have: never masked
        suffix = p.suffix if len(os.fsencode(p.suffix)) <= 16 else ""
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), self.file_mode)  # mkstemp makes 0600
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        """A file at ``key``, or a link there (wherever it leads, even nowhere: ``delete`` removes it)."""
        p = self._link_path(key)
        return p.is_symlink() or p.is_file()

    def delete(self, key: str) -> None:
        self._link_path(key).unlink(missing_ok=True)  # a link there is removed, not what it leads to

    def describe(self, key: str) -> str:
        return str(self.root / key)


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "RequestLimitExceeded"}


def transient_s3_error(exc: BaseException) -> bool:
    """Whether an S3 call that failed after the client's own retries may still succeed when repeated
    a little later: a 5xx or throttling answer, or a connection that broke (reset, cut, timed out),
    also while the answer's body was being read (botocore retries a request, never a body half read:
    ``ResponseStreamingError``, ``IncompleteReadError``, or urllib3's bare ``ProtocolError`` when the
    body of an error answer, such as a 404, was cut)."""
    from botocore.exceptions import (ClientError, ConnectionError as BotoConnectionError, HTTPClientError,
                                     IncompleteReadError)
    from urllib3.exceptions import ProtocolError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ProtocolError))


class S3Store:
    """An S3 prefix. The client comes from boto3's usual configuration (profile, env, role),
    including ``AWS_ENDPOINT_URL`` for MinIO or moto, unless one is passed in.

    A write whose client retries are spent on a transient error (a 5xx storm, throttling, broken
    connections) is tried again ``retries`` times, ``retry_delay`` s, then twice that, apart (a
    PUT of the whole body is idempotent), so a photo does not fail on a burst of S3 errors a little
    longer than the client's own retries ride out. Other errors (denied, bad key) are not retried.
    Reads (``read``, ``read_at_most``, ``get_json``) are tried again the same way, the body read to its
    end inside each try: botocore retries a request, but not a connection reset while the body of its
    answer (a photo, or a 404's error document) streams in, which would fail a photo on a blip."""

    retries = 2
    retry_delay = 1.0

    def __init__(self, bucket: str, prefix: str = "", *, client=None, sse: str | None = None,
                 kms_key_id: str | None = None):
        self.client = s3_client() if client is None else client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.sse, self.kms_key_id = sse, kms_key_id
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._listed_sizes: dict[str, int] = {}  # key -> Size, from iter_keys

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """``call()``, repeated ``retries`` times (``retry_delay`` s, then twice that, apart) while it
        fails with a transient error (:func:`transient_s3_error`) once the client's own retries are spent.
        Only for idempotent calls: a whole PUT, a GET read to its end. A connection broken while an
        answer's body was read ends as a botocore ``ResponseStreamingError`` (a ``BotoCoreError``, what
        callers catch), never as urllib3's bare ``ProtocolError``."""
        from botocore.exceptions import ResponseStreamingError
        from urllib3.exceptions import ProtocolError

        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - only transient errors are repeated, the rest re-raised
                if attempt == self.retries or not transient_s3_error(exc):
                    if isinstance(exc, ProtocolError):
                        raise ResponseStreamingError(error=exc) from exc
                    raise
            time.sleep(self.retry_delay * 2 ** attempt)

    def iter_keys(self) -> Iterator[str]:
        """Every object under the prefix, page after page, except empty folder markers (a key ending in
        '/' with 0 bytes, what consoles create for a folder); an object with bytes whose key ends in '/'
        is an input like any other (it gets its record, as in the DAG's collect)."""
        pfx = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=pfx)
        for page in pages:
            for obj in page.get("Contents", []):
                k = obj["Key"][len(pfx):]
                if k and not (k.endswith("/") and int(obj.get("Size", 0)) == 0):
                    self._listed_sizes[k] = int(obj.get("Size", 0))
                    yield k

    def size(self, key: str) -> int:
        """The object's size as the last ``iter_keys`` listed it, without reading it (the job refuses an
        object larger than any photo unread: a video is not read whole); ValueError when not listed."""
        if key not in self._listed_sizes:
            raise ValueError(f"{key!r} was not listed")
        return self._listed_sizes[key]

    def read(self, key: str, *, if_match: str | None = None) -> bytes:
        """The object's bytes; with ``if_match`` (an ETag) only that version, else S3 answers
        412 ``PreconditionFailed`` (a ClientError) and nothing is returned."""
        extra = {"IfMatch": if_match} if if_match else {}
        return self._retrying(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"].read())

    def read_at_most(self, key: str, limit: int) -> bytes | None:
        """The object's bytes when it holds at most ``limit`` (one ranged GET of ``limit`` + 1
        bytes), None when it is larger: never read whole."""
        from botocore.exceptions import ClientError

        try:
            body = self._retrying(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                                                 Range=f"bytes=0-{limit}")["Body"].read())
        except ClientError as exc:
            if error_code(exc) == "InvalidRange":  # what S3 answers a range of an empty object
                return b""
            raise
        return None if len(body) > limit else body

    @classmethod
    def for_settings(cls, settings, client=None) -> "S3Store":
        """The run's bucket (root prefix) with its encryption settings (``settings``: a ``Settings``)."""
        return cls(settings.bucket, client=client, sse=settings.sse, kms_key_id=settings.kms_key_id)

    def _sse(self) -> dict:
        extra = {}
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
            if self.kms_key_id:
                extra["SSEKMSKeyId"] = self.kms_key_id
        return extra

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """PUT ``data``, with its SHA-256 in the object's metadata (``x-amz-meta-sha256``, read back
        by :meth:`sha256`: what a rerun checks a masked copy against its audit record by)."""
        extra = self._sse()
        digest = hashlib.sha256(data).hexdigest()
        self._retrying(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                                      ContentType=content_type, Metadata={"sha256": digest}, **extra))

    def head(self, key: str) -> dict | None:
        """S3's HEAD of the object (``ETag``, ``ContentLength``, ``Metadata`` ...), None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                return None
            raise

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def sha256(self, key: str) -> str | None:
        """The SHA-256 :meth:`write` stored with the object; None when it is missing (or the object is)."""
        head = self.head(key)
        return None if head is None else (head.get("Metadata") or {}).get("sha256")

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def iter_objects(self, prefix: str = "") -> Iterator[dict]:
        """S3's object entries (``Key`` is the full key, with ``Size``, ``ETag``, ``LastModified``)
        under ``prefix`` (relative to the store's root), page after page."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            yield from page.get("Contents", [])

    def list_folders(self, prefix: str) -> Iterator[str]:
        """The full keys of the "folders" (common prefixes, ending in '/') directly under ``prefix``."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix),
                                                                      Delimiter="/")
        for page in pages:
            yield from (p["Prefix"] for p in page.get("CommonPrefixes", []))

    # ---- JSON objects: the run's manifests, shards, records, summaries, locks and reports

    def put_json(self, key: str, obj: Any, *, lines: bool = False) -> str:
        """Write ``obj`` as a JSON document (``lines``: an iterable of objects as JSON lines); its URI."""
        body = ("".join(json.dumps(o, sort_keys=True) + "\n" for o in obj) if lines
                else json.dumps(obj, indent=2, sort_keys=True))
        self.write(key, body.encode(), "application/x-ndjson" if lines else "application/json")
        return self.describe(key)

    def get_json(self, key: str) -> tuple[Any, str] | None:
        """(object, ETag) of a JSON object, or None when it does not exist; ValueError when it is not JSON."""
        from botocore.exceptions import ClientError

        def get():
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read(), obj["ETag"]

        try:
            body, etag = self._retrying(get)
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                return None
            raise
        return json.loads(body), etag

    def put_json_conditional(self, key: str, doc: dict, *, if_none_match: bool = False,
                             if_match: str | None = None) -> None:
        """One PUT of ``doc`` only if no object is there (``if_none_match``) or only over the version
        with ETag ``if_match``; otherwise S3 answers an error whose code is in ``PRECONDITION_CODES``
        (or ``MISSING_CODES``). Never retried here: a repeat could misread its own first write."""
        condition = {"IfNoneMatch": "*"} if if_none_match else {}
        if if_match is not None:
            condition["IfMatch"] = if_match
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=json.dumps(doc, sort_keys=True).encode(),
                               ContentType="application/json", **condition, **self._sse())


MISSING_CODES = ("NoSuchKey", "404", "NotFound")
PRECONDITION_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
# what a GET with IfMatch answers when the object is another version now (a GET never answers 409)
IF_MATCH_FAILED_CODES = ("PreconditionFailed", "412")


def error_code(exc) -> str:
    """The S3 error code of a botocore ``ClientError`` ('' when it has none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def s3_client(config=None):
    """A boto3 S3 client from boto3's usual configuration (profile, env, role, ``AWS_ENDPOINT_URL``),
    with adaptive retries unless ``config`` (a botocore ``Config``) is given. In Airflow tasks the
    client comes from the AWS connection instead (``airflow_support.s3_client``)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=config or Config(retries={"max_attempts": 8, "mode": "adaptive"},
                                                      max_pool_connections=32))


def read_uri(client, uri: str) -> bytes:
    """The bytes of the object at ``s3://bucket/key`` (any bucket: e.g. a transform job's output)."""
    bucket, key = parse_s3_uri(uri)
    return S3Store(bucket, client=client).read(key)


def read_json_lines(client, uri: str) -> list[dict]:
    """The objects of a JSON-lines file at ``s3://bucket/key`` (a manifest, a shard, detection records)."""
    return [json.loads(line) for line in read_uri(client, uri).decode().splitlines() if line.strip()]


def parse_s3_uri(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    return u.netloc, u.path.lstrip("/")


def is_hidden(key: str) -> bool:
    """A file name starting with '.' (.DS_Store, macOS '._' AppleDouble files): the CLI and the DAG
    pass these over, naming them (never dropped silently); files inside hidden folders are not."""
    return key.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def normalise_key(key: str) -> str:
    """``key`` as a clean relative path: no empty or '.' segments, '..' resolved, no leading '/'.

    Two inputs whose keys normalise alike would write one output (``a/../b.jpg`` and ``b.jpg``,
    ``x//y.jpg`` and ``x/y.jpg``); a key that climbs above the root raises ValueError.
    """
    parts: list[str] = []
    for seg in key.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                raise ValueError(f"key {key!r} climbs out of the destination ('..' above its root)")
            parts.pop()
        else:
            parts.append(seg)
    if not parts:
        raise ValueError(f"key {key!r} names no file")
    return "/".join(parts)


def _location(uri: str) -> tuple[str, tuple[str, ...]]:
    """Where ``uri`` points, normalised for comparison: (root, path segments)."""
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return f"s3://{bucket}", tuple(s for s in posixpath.normpath("/" + prefix).split("/") if s)
    return "file", Path(os.path.realpath(Path(uri).expanduser())).parts


def overlap(src: str, dst: str) -> str | None:
    """Why writing ``dst`` could touch ``src``'s originals, or None when they are apart.

    Compares resolved local paths (symlinks, '.', '..', trailing '/') and S3 bucket + prefix with
    empty and dot segments collapsed; equal or nested either way is an overlap.
    """
    if _location(src) == _location(dst):
        return f"SRC {src} and DST {dst} are the same place"
    if inside(dst, src):
        return f"DST {dst} lies inside SRC {src}"
    if inside(src, dst):
        return f"SRC {src} lies inside DST {dst}"
    return None


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (resolved as ``overlap`` resolves them)."""
    (pr, pp), (fr, fp) = _location(path), _location(folder)
    return pr == fr and pp[:len(fp)] == fp


def open_store(uri: str, *, create: bool = False, client=None) -> Store:
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, client=client)
    return LocalStore(uri, create=create)
