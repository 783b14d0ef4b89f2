"""`platemask mask` run by a hostile operator on hostile inputs: the promises hold (no plate leaves
unmasked, originals untouched, every input exactly one record, honest exit codes and summaries)."""
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from platemask.cli import main

from conftest import jpeg_bytes, without_root_file_override


def _photos(folder: Path, n: int, seed: int = 3, size=(48, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        (folder / f"p{i:03d}.jpg").write_bytes(jpeg_bytes(rng.integers(0, 255, (*size, 3), dtype=np.uint8)))


def _s3_photos(s3, bucket: str, n: int, seed: int, size=(48, 64)) -> None:
    """``_photos`` in an S3 bucket of its own: ``raw/p000.jpg`` …"""
    s3.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(seed)
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"raw/p{i:03d}.jpg",
                      Body=jpeg_bytes(rng.integers(0, 255, (*size, 3), dtype=np.uint8)))


def _start(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "platemask.cli", "mask", *map(str, args)], stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec_fn, **kw)


def _wait_for_outputs(proc: subprocess.Popen, dst: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (not dst.is_dir() or len(list(dst.iterdir())) < n):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)


@contextlib.contextmanager
def _held_part_way(s3, args, bucket: str, written: str, outputs: int = 3):
    """A ``platemask mask`` run (``args``) stopped with SIGSTOP once ``outputs`` masked copies are under
    ``written`` in ``bucket`` (it would otherwise finish tiny photos within seconds on an idle machine,
    before a second run is tried); its lock stays, well inside its lease. On leaving, it is resumed and
    waited for (its stderr as ``.err``), or killed if the body failed."""
    proc = _start(args)
    try:
        deadline = time.monotonic() + 240
        while s3.list_objects_v2(Bucket=bucket, Prefix=written).get("KeyCount", 0) < outputs:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGCONT)
        proc.err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_an_interrupted_run_never_unlinks_a_device_given_as_report(tmp_path, model_dir):
    """``--report /dev/null`` and Ctrl-C: the stopped run removed "its" report by unlinking the path,
    as root the machine's /dev/null itself (here an identical device node). Now only the regular file
    the run opened is removed; a device (or a pipe) stays."""
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    src, dst = tmp_path / "src", tmp_path / "dst"
    _photos(src, 300)
    proc = _start([src, dst, "--model", model_dir, "--report", null, "--batch-size", "2"])
    try:
        _wait_for_outputs(proc, dst, 3)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "no report written" in err
    assert null.exists() and stat.S_ISCHR(os.stat(null).st_mode)


def test_a_dst_that_is_a_file_is_a_usage_error_before_the_model_loads(tmp_path, model_dir, capsys):
    """DST given as an existing file (or a folder under one): a traceback (FileExistsError,
    NotADirectoryError) and exit 1 after the model was loaded. Now exit 2, naming the file."""
    src = tmp_path / "src"
    _photos(src, 2)
    afile = tmp_path / "out.jpg"
    afile.write_bytes(b"an earlier export")
    for dst in (afile, afile / "sub"):
        assert main(["mask", str(src), str(dst), "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err
        assert f"{afile} is a file, not a folder" in err and "Traceback" not in err
    assert afile.read_bytes() == b"an earlier export"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a disk that is always full)")
def test_a_records_file_on_a_full_disk_unpublishes_and_fails_its_photos_honestly(tmp_path, model_dir, capsys):
    """--detections on a full disk: the first record's write ended the run in a traceback (exit 1, no
    summary) while the writer threads went on publishing masked photos that had no record. Now each
    photo whose record cannot be written fails (record_not_written) and its masked copy leaves DST,
    the summary counts it, exit 3; a report the disk cannot take is named, not a traceback."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _photos(src, 6)
    report = tmp_path / "r.json"
    assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", "/dev/full",
                 "--report", str(report)]) == 3
    err = capsys.readouterr().err
    assert "cannot write to /dev/full: No space left on device" in err
    assert "6 images: 0 masked, 0 no plate, 6 failed" in err
    assert not [p for p in dst.rglob("*") if p.is_file()]  # nothing published without its record
    qa = json.loads(report.read_text())
    assert qa["by_status"]["failed"] == 6 and list(qa["failures_by_reason"]) == ["record_not_written"]
    # the report on a full disk: the photos are masked and recorded, the run says no report was written
    det = tmp_path / "d.jsonl"
    assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(det),
                 "--report", "/dev/full"]) == 3
    err = capsys.readouterr().err
    assert "cannot write the report /dev/full (No space left on device): no report written" in err
    assert sorted(r["key"] for r in _records(det) if r["status"] != "failed") == sorted(
        p.name for p in dst.iterdir())
    assert os.path.exists("/dev/full")


def test_a_second_run_into_the_same_dst_or_records_file_is_refused_while_the_first_runs(tmp_path, model_dir, capsys):
    """Two runs at once (an overlapping cron job): the second emptied the first's --detections under
    it (the first's later records landed behind a hole of NUL bytes, lines broken, most of its records
    lost, and it still exited 0), and both wrote the same DST, where the older version's mask could
    land last. Now a run holds DST (and the folders above it) and its records files: a second run into
    the same DST, a folder inside or around it, or onto the same records file exits 2 before writing."""
    src, out = tmp_path / "src", tmp_path / "out"
    _photos(src, 300)
    dst, det = out / "a", tmp_path / "d.jsonl"
    first = _start([src, dst, "--model", model_dir, "--detections", det, "--batch-size", "2"])
    try:
        _wait_for_outputs(first, dst, 3)
        for other_dst, extra, why in ((dst, [], f"is writing DST {dst} or a folder inside it"),
                                      (dst / "sub", [], f"is writing {dst}, a folder that holds DST"),
                                      (out, [], f"is writing DST {out} or a folder inside it"),
                                      (tmp_path / "b", ["--detections", str(det)], f"{det} is being written by another")):
            assert main(["mask", str(src), str(other_dst), "--model", str(model_dir), *extra]) == 2, other_dst
            assert why in capsys.readouterr().err
            assert first.poll() is None  # the refusals came while the first run was still writing
        first.send_signal(signal.SIGTERM)
        err = first.communicate(timeout=120)[1]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err[-2000:]
    raw = det.read_bytes()
    assert b"\0" not in raw
    recs = [json.loads(line) for line in raw.decode().splitlines()]  # every line whole
    assert sorted(r["key"] for r in recs) == sorted(p.name for p in dst.iterdir())
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_a_rerun_removes_the_half_written_files_a_killed_run_left_in_dst(tmp_path, model_dir, capsys):
    """SIGKILL (the OOM killer, a power cut) during a write left LocalStore's temporary file
    (``.tmp-r8_kyn44.jpg``, 4 MB of a 20 MB photo, seen for real) in DST; no rerun ever removed it, and
    a sync of DST published it. The rerun, holding DST, now removes such files and says so."""
    import tempfile

    src, dst = tmp_path / "src", tmp_path / "dst"
    _photos(src / "day", 2)
    (dst / "day").mkdir(parents=True)
    left = []
    for folder in (dst, dst / "day"):  # what LocalStore.write makes before a kill cut it short
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jpg")
        os.write(fd, b"\xff\xd8 half a masked photo")
        os.close(fd)
        left.append(Path(tmp))
    (dst / ".tmp-notes.txt").write_text("not ours")
    assert main(["mask", str(src), str(dst), "--model", str(model_dir)]) == 0
    err = capsys.readouterr().err
    assert "removed 2 half-written temporary file(s) that a run killed mid-write left in DST" in err
    assert not [p for p in left if p.exists()]
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        ".tmp-notes.txt", "day/p000.jpg", "day/p001.jpg"]


def _in_own_mount_namespace(script: str) -> subprocess.CompletedProcess:
    """``script`` (sh) in a private mount namespace: its bind mounts vanish with it."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)


def test_src_and_dst_that_are_one_folder_through_a_bind_mount_are_refused(tmp_path, model_dir):
    """``mount --bind /photos /view`` (or a container's ``-v /photos:/in -v /photos:/out``), then
    ``platemask mask /photos /view``: the path check compared resolved paths, saw two folders, and
    every original was replaced by its masked copy, exit 0. Now the folders' identities are compared
    too: DST (or a records file) in SRC through such a mount, or SRC in DST, is refused, exit 2."""
    import hashlib
    import shlex
    import shutil

    if shutil.which("unshare") is None or _in_own_mount_namespace("true").returncode != 0:
        pytest.skip("needs unshare --mount (root or user namespaces)")
    src, view = tmp_path / "photos", tmp_path / "view"
    _photos(src, 2)
    view.mkdir()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    cli = f"{shlex.quote(sys.executable)} -m platemask.cli mask --model {shlex.quote(str(model_dir))}"
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    for args, what in ((f"{q(src)} {q(view)}", "DST"), (f"{q(src)} {q(view / 'masked')}", "DST"),
                       (f"{q(view / 'sub')} {q(src)}", "SRC"),
                       (f"{q(src)} {q(tmp_path / 'out')} --detections {q(view / 'p000.jpg')}", "--detections")):
        (src / "sub").mkdir(exist_ok=True)
        out = _in_own_mount_namespace(f"mount --bind {q(src)} {q(view)} && cd {q(Path.cwd())} && {cli} {args}")
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert f"platemask: error: {what} " in out.stderr and "reached by another path" in out.stderr, out.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir() if p.is_file()} == before


def test_a_folder_in_src_that_cannot_be_listed_is_a_failed_record_not_silence(tmp_path, model_dir):
    """A folder of SRC this user cannot list (another user's upload folder, mode 700; an I/O error):
    os.walk passed over it without a word, so its photos got no record and no mention and the run
    said "1 images: 1 no plate", exit 0. Now it is one failed record (unreadable_folder) naming the
    folder and the fix, in the log and the report too, and the exit code is 3."""
    src, dst, det, report = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl", tmp_path / "r.json"
    _photos(src / "open", 1)
    _photos(src / "locked", 2)
    os.chmod(src / "locked", 0)
    cmd = [sys.executable, "-m", "platemask.cli", "mask", str(src), str(dst), "--model", str(model_dir),
           "--detections", str(det), "--report", str(report)]
    cmd = without_root_file_override(cmd)  # root lists any folder
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(src / "locked", 0o755)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "1 folder(s) in SRC cannot be listed, the photos in them are NOT masked: 'locked/'" in out.stderr
    recs = {r["key"]: r for r in _records(det)}
    assert set(recs) == {"locked/", "open/p000.jpg"}
    assert recs["locked/"]["status"] == "failed" and recs["locked/"]["reason"] == "unreadable_folder"
    assert "Permission denied" in recs["locked/"]["error"] and "make it readable" in recs["locked/"]["error"]
    assert recs["open/p000.jpg"]["status"] == "no_plate"
    assert json.loads(report.read_text())["failures_by_reason"]["unreadable_folder"]["count"] == 1
    assert not (dst / "locked").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_two_names_that_are_not_utf8_stay_two_names_in_the_records(tmp_path, model_dir):
    """Files named b'\\xff.jpg' and b'\\xfe.jpg' (Latin-1 names from an old camera or a Windows share):
    their records' keys held surrogate escapes, which jq, Node or Go read as U+FFFD, so the two
    records had one key outside Python and could not be matched to their files. Now such a record
    also carries the name's bytes, percent-encoded (key_bytes)."""
    import urllib.parse

    src, dst, det = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl"
    _photos(src, 3)
    names = [b"\xff.jpg", b"\xfe.jpg"]
    for name, p in zip(names, sorted(src.iterdir())):
        os.rename(p, os.path.join(os.fsencode(src), name))
    assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(det)]) == 0
    recs = _records(det)
    assert len(recs) == 3 and sum("key_bytes" in r for r in recs) == 2
    outside_python = {r["key"].encode("utf-8", "replace") for r in recs}
    exact = {urllib.parse.unquote_to_bytes(r["key_bytes"]) if "key_bytes" in r else r["key"].encode() for r in recs}
    assert len(outside_python) == 2  # what a reader other than Python sees of the keys alone
    assert exact == set(os.listdir(os.fsencode(dst))) == {*names, b"p002.jpg"}
    assert "key_bytes" not in next(r for r in recs if r["key"] == "p002.jpg")


def test_a_name_with_a_long_suffix_is_masked_not_failed_for_its_temporary_name(tmp_path, model_dir):
    """A file named "car." followed by 245 characters (a name the file system takes: 249 bytes) could
    never be masked: its half-written copy, ".tmp-XXXXXXXX" plus that suffix, was longer than the 255
    bytes a name may have (write_error, ENAMETOOLONG), on every run."""
    src, dst, det = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl"
    _photos(src, 1)
    name = "car." + "j" * 245
    os.rename(next(src.iterdir()), src / name)
    assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(det)]) == 0
    (rec,) = _records(det)
    assert rec["status"] in ("masked", "no_plate") and os.listdir(dst) == [name]


def test_links_in_dst_where_masked_copies_go_are_replaced_not_written_through(tmp_path, model_dir):
    """DST deduplicated with symlinks (``rdfind -makesymlinks``: identical masked copies became
    ``a.jpg -> b.jpg``), then a.jpg re-shot and c.jpg broken in SRC: the rerun wrote a's new masked
    photo through the link over b.jpg, so DST served another photo as b's (b's record naming another
    hash), c's stale-copy removal deleted b.jpg through its link, and the failed c.jpg still served
    a photo. Now the links at output paths are removed first (only the links): every output is its
    own record's, and a failed input has none."""
    import hashlib

    src, dst, det = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl"
    _photos(src, 3)
    for old, new in zip(sorted(src.iterdir()), ("a.jpg", "b.jpg", "c.jpg")):
        old.rename(src / new)
    assert main(["mask", str(src), str(dst), "--model", str(model_dir)]) == 0
    for name in ("a.jpg", "c.jpg"):
        (dst / name).unlink()
        (dst / name).symlink_to("b.jpg")
    _photos(tmp_path / "new", 1, seed=11)
    (src / "a.jpg").write_bytes((tmp_path / "new" / "p000.jpg").read_bytes())
    (src / "c.jpg").write_bytes((src / "c.jpg").read_bytes()[:200])
    assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(det)]) == 3
    recs = {r["key"]: r for r in _records(det)}
    assert recs["c.jpg"]["status"] == "failed"
    assert not [p for p in dst.iterdir() if p.is_symlink()]
    assert sorted(p.name for p in dst.iterdir()) == ["a.jpg", "b.jpg"]
    for name in ("a.jpg", "b.jpg"):
        assert hashlib.sha256((dst / name).read_bytes()).hexdigest() == recs[name]["output_sha256"], name


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_records_path_that_is_a_pipe_nobody_reads_is_refused_instead_of_hanging(tmp_path, model_dir):
    """--report (or --detections) naming a named pipe that no process reads: opening it waited for a
    reader forever, before any photo and without a word. Now exit 2 naming the pipe; a pipe that is
    read (``--report >(jq .)``-style) still gets the report."""
    src = tmp_path / "src"
    _photos(src, 2)
    fifo = tmp_path / "report.pipe"
    os.mkfifo(fifo)
    args = [sys.executable, "-m", "platemask.cli", "mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir),
            "--report", str(fifo)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "it is a named pipe that no process reads" in out.stderr
    with subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE) as reader:
        time.sleep(0.5)  # the reader has the pipe open
        assert subprocess.run(args, capture_output=True, text=True, timeout=120).returncode == 0
        assert json.loads(reader.communicate(timeout=60)[0])["images"] == 2


def test_a_device_or_pipe_in_src_is_failed_without_being_opened(tmp_path, model_dir):
    """A device node in SRC (a dashcam card or an extracted archive mounted without nodev): the job
    opened it (O_NONBLOCK, to find out it is not a file), and opening a device acts: a watchdog node
    arms the watchdog and reboots the machine, a tape rewinds, a serial line drops DTR. Now a named
    pipe, socket or device fails (not_a_file) unopened, seen by the system calls the run made."""
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("needs strace to see which files the run opens")
    src, dst, det, trace = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl", tmp_path / "openat.trace"
    _photos(src, 1)
    os.mkfifo(src / "pipe.jpg")
    try:
        os.mknod(src / "cam.jpg", stat.S_IFCHR | 0o644, os.makedev(1, 3))  # what /dev/null is: harmless to open
        nodes = ["pipe.jpg", "cam.jpg"]
    except PermissionError:
        nodes = ["pipe.jpg"]
    out = subprocess.run(["strace", "-f", "-e", "trace=openat,open", "-o", str(trace), sys.executable, "-m",
                          "platemask.cli", "mask", str(src), str(dst), "--model", str(model_dir), "--detections",
                          str(det)], capture_output=True, text=True, timeout=300)
    if "ptrace" in out.stderr and out.returncode != 3:
        pytest.skip(f"strace cannot trace here: {out.stderr[-300:]}")
    assert out.returncode == 3, out.stderr[-2000:]
    opened = [line for line in trace.read_text().splitlines() if any(f"/{n}\"" in line for n in nodes)]
    assert opened == []
    recs = {r["key"]: r for r in _records(det)}
    assert recs["p000.jpg"]["status"] == "no_plate"
    for n in nodes:
        assert recs[n]["status"] == "failed" and recs[n]["reason"] == "not_a_file", recs[n]
        assert "is not a regular file" in recs[n]["error"] and "not opened" in recs[n]["error"]
    assert sorted(p.name for p in dst.iterdir()) == ["p000.jpg"]


def test_a_second_run_into_the_same_s3_dst_is_refused_while_the_first_runs(s3_env, tmp_path, model_dir, capsys):
    """Two runs at once into one S3 DST (two cron jobs, two machines): a local DST is held with a flock,
    an S3 one was not held at all. Both masked every photo and wrote it there, so the copies in DST were
    whichever run wrote last and the other run's records and report described copies that were not there
    (with two --jpeg-quality values: 60 of 60 records naming another SHA-256). Now a run holds an S3 DST
    with a lock document written by a conditional PUT: a second run into it, or into a prefix inside it,
    exits 2 before writing, naming the run and what to do; the lock goes when the run ends, and a lock
    whose run was killed on this machine is taken over."""
    s3 = s3_env
    _s3_photos(s3, "lockbkt", 150, seed=5)
    lock = "masked/.platemask-mask.lock.json"
    with _held_part_way(s3, ["s3://lockbkt/raw", "s3://lockbkt/masked", "--model", model_dir, "--batch-size", "2",
                             "--detections", tmp_path / "first.jsonl"], "lockbkt", "masked/p") as first:
        for other in ("s3://lockbkt/masked", "s3://lockbkt/masked/", "s3://lockbkt/masked/sub"):
            assert main(["mask", "s3://lockbkt/raw", other, "--model", str(model_dir),
                         "--detections", str(tmp_path / "second.jsonl")]) == 2, other
            err = capsys.readouterr().err
            assert f"pid {first.pid}" in err and "is writing s3://lockbkt/masked" in err, err
            assert f"delete s3://lockbkt/masked/{lock.rsplit('/', 1)[1]}" in err
            assert first.poll() is None  # refused while the first run was still writing
    assert not (tmp_path / "second.jsonl").exists()
    assert first.returncode == 0, first.err[-2000:]
    assert s3.list_objects_v2(Bucket="lockbkt", Prefix=lock)["KeyCount"] == 0  # released at the end
    recs = _records(tmp_path / "first.jsonl")
    assert len(recs) == 150
    for r in recs:  # every record describes the copy in DST
        head = s3.head_object(Bucket="lockbkt", Key="masked/" + r["key"])
        assert head["Metadata"]["sha256"] == r["output_sha256"], r["key"]
    # a lock left by a run killed on this machine (its process is gone) does not block the next run;
    # one whose pid is gone in another pid namespace (a container with this host name) does
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = {"run": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "then",
            "boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "pid_ns": os.stat("/proc/self/ns/pid").st_ino}
    s3.put_object(Bucket="lockbkt", Key=lock, Body=json.dumps({**here, "pid_ns": 1}).encode())
    assert main(["mask", "s3://lockbkt/raw", "s3://lockbkt/masked", "--model", str(model_dir)]) == 2
    assert f"pid {here['pid']}" in capsys.readouterr().err
    s3.put_object(Bucket="lockbkt", Key=lock, Body=json.dumps(here).encode())
    assert main(["mask", "s3://lockbkt/raw", "s3://lockbkt/masked", "--model", str(model_dir)]) == 0
    assert s3.list_objects_v2(Bucket="lockbkt", Prefix=lock)["KeyCount"] == 0


def test_a_run_into_an_s3_prefix_around_a_running_runs_dst_is_refused(s3_env, tmp_path, model_dir, capsys):
    """A run into ``masked/de`` running, a second run into ``masked`` (or the bucket's root): that one writes
    ``masked/de/…`` too, so the two overwrote each other's copies there; only a DST inside a running one
    was refused (the lock documents above it), not one around it. Now a run leaves a note naming its
    lock in every prefix above its DST, and a run lists the notes in its own DST: refused, exit 2, naming
    the run, before writing anything. The notes go when the run ends; a note left by a run that is over
    (its lock gone) blocks nothing."""
    s3 = s3_env
    _s3_photos(s3, "nestsrc", 150, seed=6)
    s3.create_bucket(Bucket="nestbkt")
    with _held_part_way(s3, ["s3://nestsrc/raw", "s3://nestbkt/masked/de", "--model", model_dir, "--batch-size", "2",
                             "--detections", tmp_path / "first.jsonl"], "nestbkt", "masked/de/p") as first:
        for other in ("s3://nestbkt/masked", "s3://nestbkt/masked/", "s3://nestbkt"):
            assert main(["mask", "s3://nestsrc/raw", other, "--model", str(model_dir),
                         "--detections", str(tmp_path / "second.jsonl")]) == 2, other
            err = capsys.readouterr().err
            assert f"pid {first.pid}" in err and "is writing s3://nestbkt/masked/de, a prefix inside DST" in err, err
            assert first.poll() is None
        # a DST beside it is not its business; a SRC that holds the running run's DST reads its lock and notes
        # as that run's files, not as hidden photos to rename
        assert main(["mask", "s3://nestbkt/masked", "s3://nestbkt/masked-fr", "--model", str(model_dir)]) == 0
        err = capsys.readouterr().err
        assert "2 lock file(s) or note(s) of platemask mask runs skipped" in err and "rename" not in err, err
    assert not (tmp_path / "second.jsonl").exists()
    assert first.returncode == 0, first.err[-2000:]
    left = [o["Key"] for o in s3.list_objects_v2(Bucket="nestbkt").get("Contents", []) if ".platemask-mask" in o["Key"]]
    assert left == []  # its lock and its notes, and the run beside it's, went with them
    assert {r["status"] for r in _records(tmp_path / "first.jsonl")} <= {"masked", "no_plate"}
    # a note whose run is over (no lock there any more) does not block, nor one naming a live run's lock outside
    # DST (copied or written by hand)
    s3.put_object(Bucket="nestbkt", Key="masked/.platemask-mask.inner.old.json",
                  Body=json.dumps({"run": "old", "lock": "masked/it/.platemask-mask.lock.json"}).encode())
    s3.put_object(Bucket="nestbkt", Key="elsewhere/.platemask-mask.lock.json",
                  Body=json.dumps({"run": "live", "host": "another-host", "pid": 1, "started_at": "now"}).encode())
    s3.put_object(Bucket="nestbkt", Key="masked/.platemask-mask.inner.live.json",
                  Body=json.dumps({"run": "live", "lock": "elsewhere/.platemask-mask.lock.json"}).encode())
    assert main(["mask", "s3://nestsrc/raw", "s3://nestbkt/masked", "--model", str(model_dir)]) == 0
    notes = [o["Key"] for o in s3.list_objects_v2(Bucket="nestbkt", Prefix="masked/.platemask-mask.inner.")["Contents"]]
    assert notes == ["masked/.platemask-mask.inner.live.json"]  # the ended run's note was removed on the way


def test_an_s3_src_that_cannot_be_listed_is_a_usage_error_not_a_traceback(s3_env, tmp_path, model_dir, capsys):
    """SRC in a bucket that does not exist (a typo), or that these credentials may not list: the run
    loaded the model and then ended in botocore's traceback (exit 1, no word of what to do). Now it
    exits 2 naming SRC, S3's answer and what to check; nothing is written."""
    dst = tmp_path / "out"
    assert main(["mask", "s3://no-such-bucket-here/raw", str(dst), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "cannot list SRC s3://no-such-bucket-here/raw" in err and "NoSuchBucket" in err
    assert "Check the bucket's name, the credentials" in err
    assert not dst.exists() or not list(dst.iterdir())


def test_a_run_stopped_while_it_starts_gives_back_its_s3_dst(s3_env, tmp_path, model_dir):
    """SIGTERM while the model loads (a ``docker stop`` right after the start): the process died on the
    spot (SIGTERM's default until the job starts), leaving the S3 DST's lock document behind, and the
    next run, in a new container, was refused for a run that no longer existed. Now a stop before any
    photo is read ends the run with 143, saying nothing was written, and the lock is given back."""
    s3 = s3_env
    s3.create_bucket(Bucket="earlystop")
    s3.put_object(Bucket="earlystop", Key="raw/p.jpg", Body=jpeg_bytes(np.zeros((48, 64, 3), np.uint8)))
    lock = "masked/.platemask-mask.lock.json"
    proc = _start(["s3://earlystop/raw", "s3://earlystop/masked", "--model", model_dir])
    try:
        deadline = time.monotonic() + 120
        while s3.list_objects_v2(Bucket="earlystop", Prefix=lock)["KeyCount"] == 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted (SIGTERM)" in err
    assert s3.list_objects_v2(Bucket="earlystop", Prefix=lock)["KeyCount"] == 0
    assert s3.list_objects_v2(Bucket="earlystop", Prefix="masked/p")["KeyCount"] == 0


def test_a_lock_put_resent_after_its_answer_was_lost_is_not_taken_for_another_run(s3_env, tmp_path, model_dir,
                                                                                   monkeypatch, capsys):
    """The lock's conditional PUT reached S3 but its answer was lost (a read timeout): botocore sends
    the same PUT again, which S3 refuses (412, the lock is there: this run's own). The run read its own
    lock document as another run's, exited 2 naming its own pid, and left the lock behind: every later
    run into DST from another container was refused until someone deleted it. The lock this run wrote
    is its own: the run goes on and gives it back at the end."""
    import boto3

    s3 = s3_env
    s3.create_bucket(Bucket="lostanswer")
    s3.put_object(Bucket="lostanswer", Key="raw/p.jpg", Body=jpeg_bytes(np.zeros((48, 64, 3), np.uint8)))
    lock = "masked/.platemask-mask.lock.json"
    resent = []

    def resend_once(response, request_dict, **_):  # the PUT arrived; its answer did not: botocore retries it
        if request_dict["url_path"].endswith(lock) and response and response[1]["ResponseMetadata"][
                "HTTPStatusCode"] == 200 and not resent:
            resent.append(request_dict["url_path"])
            return 0
        return None

    real_client = boto3.client

    def client(*args, **kwargs):
        c = real_client(*args, **kwargs)
        c.meta.events.register_first("needs-retry.s3.PutObject", resend_once)
        return c

    monkeypatch.setattr(boto3, "client", client)
    code = main(["mask", "s3://lostanswer/raw", "s3://lostanswer/masked", "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert resent, "the lock's PUT was never resent"
    assert code == 0, err[-2000:]
    assert f"pid {os.getpid()}" not in err
    assert s3.list_objects_v2(Bucket="lostanswer", Prefix=lock)["KeyCount"] == 0
    assert s3.list_objects_v2(Bucket="lostanswer", Prefix="masked/p.jpg")["KeyCount"] == 1


def test_runs_into_an_s3_dst_this_role_may_only_put_to_are_not_refused_after_the_first(s3_env, tmp_path, model_dir,
                                                                                       monkeypatch, capsys):
    """A role that may only PutObject in DST (a write-only delivery prefix: no GetObject, no DeleteObject
    there) masked into it run after run: masking needs nothing else. Since the S3 DST lock, the first run
    could not read its lock back to remove it (AccessDenied, passed over in silence) and left it there;
    every later run then found a lock it could not read and exited 2, for good. Now a run that cannot
    read or remove the lock says so and goes on unguarded (as on a file system without locks), and the
    run that left it names the key to delete."""
    import boto3
    from types import SimpleNamespace

    s3 = s3_env
    s3.create_bucket(Bucket="putonly")
    s3.put_object(Bucket="putonly", Key="raw/p.jpg", Body=jpeg_bytes(np.zeros((48, 64, 3), np.uint8)))

    def denied(params, **_):  # what S3 answers this role for anything but a PUT under masked/
        if "/putonly/masked/" in params["url_path"] or params["url_path"].startswith("/masked/"):
            return (SimpleNamespace(status_code=403, headers={}),
                    {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                     "ResponseMetadata": {"HTTPStatusCode": 403}})
        return None

    real_client = boto3.client

    def client(*args, **kwargs):
        c = real_client(*args, **kwargs)
        for op in ("GetObject", "HeadObject", "DeleteObject"):
            c.meta.events.register_first(f"before-call.s3.{op}", denied)
        return c

    monkeypatch.setattr(boto3, "client", client)
    for n in range(2):
        code = main(["mask", "s3://putonly/raw", "s3://putonly/masked", "--model", str(model_dir),
                     "--detections", str(tmp_path / f"run{n}.jsonl")])
        err = capsys.readouterr().err
        assert code == 0, (n, err[-2000:])
        assert [r["status"] for r in _records(tmp_path / f"run{n}.jsonl")] in (["masked"], ["no_plate"]), n
    assert "s3://putonly/masked/.platemask-mask.lock.json" in err  # named: what to delete, or what was not read


def test_a_run_started_with_nohup_is_not_stopped_when_its_terminal_closes(tmp_path, model_dir):
    """``nohup platemask mask ... &`` and the terminal closed: SIGHUP, which nohup leaves ignored for the
    run, stopped it (exit 129, the photos not yet done with no record): the run installed its own handler
    for it, while the model loaded and while it masked. A stop signal this process was started ignoring
    stays ignored."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _photos(src, 40)

    def nohup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = _start([src, dst, "--model", model_dir, "--batch-size", "2", "--detections", tmp_path / "r.jsonl"],
                  preexec_fn=nohup)
    try:
        time.sleep(1.5)  # starting: the model loads
        proc.send_signal(signal.SIGHUP)
        _wait_for_outputs(proc, dst, 3)
        proc.send_signal(signal.SIGHUP)  # masking
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert len(_records(tmp_path / "r.jsonl")) == 40


def test_a_lock_left_by_a_run_killed_on_another_host_is_taken_over_once_its_lease_runs_out(s3_env, tmp_path, model_dir,
                                                                                          monkeypatch, capsys):
    """A run into an S3 DST killed without a word (SIGKILL: an OOM kill, a ``docker stop`` whose grace ran out,
    a cancelled CI job, a lost pod, a reboot) left its lock document there. It was taken over only from a run
    on this host, boot and pid namespace whose pid was gone, so every later run in a new container exited 2
    for good, until someone deleted the key by hand. A run now refreshes its lock (a lease); a lock S3 has kept
    unrefreshed for longer than the lease is taken over, naming the run that left it."""
    import platemask.cli as cli

    s3 = s3_env
    s3.create_bucket(Bucket="stalelock")
    s3.put_object(Bucket="stalelock", Key="raw/p.jpg", Body=jpeg_bytes(np.zeros((48, 64, 3), np.uint8)))
    lock = "masked/.platemask-mask.lock.json"
    monkeypatch.setattr(cli, "LOCK_REFRESH_S", 0.5)
    monkeypatch.setattr(cli, "LOCK_LEASE_S", 600.0)
    s3.put_object(Bucket="stalelock", Key=lock,
                  Body=json.dumps({"run": "x", "host": "other-pod", "pid": 1, "started_at": "then"}).encode())
    args = ["mask", "s3://stalelock/raw", "s3://stalelock/masked", "--model", str(model_dir),
            "--detections", str(tmp_path / "run.jsonl")]
    assert main(args) == 2  # within its lease: that run may still be writing
    err = capsys.readouterr().err
    assert "host 'other-pod', pid 1" in err and "once S3 has kept it unrefreshed for 600 s" in err, err
    assert s3.list_objects_v2(Bucket="stalelock", Prefix="masked/p")["KeyCount"] == 0
    monkeypatch.setattr(cli, "LOCK_LEASE_S", 3.0)
    time.sleep(4.5)  # S3's clock: its LastModified is now more than a lease ago
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "taking over the lock s3://stalelock/masked/.platemask-mask.lock.json of run 'x' (host 'other-pod', pid 1" in err
    assert [r["status"] for r in _records(tmp_path / "run.jsonl")] in (["masked"], ["no_plate"])
    assert s3.list_objects_v2(Bucket="stalelock", Prefix=lock)["KeyCount"] == 0  # given back at the end


def test_a_live_runs_s3_dst_lock_is_refreshed_and_never_taken_over_after_the_lease(s3_env, tmp_path, model_dir,
                                                                                  monkeypatch, capsys):
    """The other side of the lease: a run still writing DST keeps its lock fresh (S3's LastModified moves on
    while it runs), so a second run started long after a lease's worth of time is still refused, naming it."""
    import platemask.cli as cli

    s3 = s3_env
    # photos big enough that the first run is still masking well after the 5 s below on a fast idle machine
    # (48 x 64 ones took it ~9 s in all here); it is stopped once the lease is tested
    _s3_photos(s3, "livelock", 300, seed=7, size=(144, 192))
    lock = "masked/.platemask-mask.lock.json"
    monkeypatch.setattr(cli, "LOCK_REFRESH_S", 0.5)
    monkeypatch.setattr(cli, "LOCK_LEASE_S", 2.0)
    code = ("import sys, platemask.cli as c; c.LOCK_REFRESH_S = 0.5; c.LOCK_LEASE_S = 2.0; "
            "sys.exit(c.main(['mask'] + sys.argv[1:]))")
    first = subprocess.Popen([sys.executable, "-c", code, "s3://livelock/raw", "s3://livelock/masked", "--model",
                              str(model_dir), "--batch-size", "1"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while s3.list_objects_v2(Bucket="livelock", Prefix="masked/p").get("KeyCount", 0) < 1:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        seen = {s3.head_object(Bucket="livelock", Key=lock)["LastModified"]}
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:  # more than two leases
            seen.add(s3.head_object(Bucket="livelock", Key=lock)["LastModified"])
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the lease was tested: give it more photos"
        assert len(seen) >= 3, seen  # refreshed while it ran
        assert main(["mask", "s3://livelock/raw", "s3://livelock/masked", "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err
        assert f"pid {first.pid}" in err and "taking over" not in err, err
        assert first.poll() is None
        assert json.loads(s3.get_object(Bucket="livelock", Key=lock)["Body"].read())["pid"] == first.pid
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert s3.list_objects_v2(Bucket="livelock", Prefix=lock)["KeyCount"] == 0
