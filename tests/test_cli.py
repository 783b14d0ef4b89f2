"""The CLI contract other parts of the product rely on: paths, records, report, exit codes."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from platemask.cli import build_parser, main

from conftest import jpeg_bytes, png_bytes

RECORD_KEYS = {"key", "status", "width", "height", "plates", "model", "input_sha256", "output_sha256"}


@pytest.fixture
def photo_dir(tmp_path, scene):
    src = tmp_path / "src"
    (src / "day1" / "cam").mkdir(parents=True)
    img, quads, _ = scene
    (src / "car.jpg").write_bytes(jpeg_bytes(img))
    (src / "day1" / "cam" / "car.png").write_bytes(png_bytes(img))
    (src / "day1" / "empty_road.jpg").write_bytes(jpeg_bytes(np.full((360, 640, 3), 90, np.uint8)))
    return src, quads


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_good_inputs_exit_0_and_mirror_paths(photo_dir, tmp_path, model_dir):
    src, quads = photo_dir
    dst = tmp_path / "dst"
    before = _snapshot(src)
    rc = main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(tmp_path / "d.jsonl"),
               "--report", str(tmp_path / "r.json")])
    assert rc == 0
    assert _snapshot(src) == before  # originals untouched
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "car.jpg", "day1/cam/car.png", "day1/empty_road.jpg"]
    assert Image.open(dst / "car.jpg").format == "JPEG" and Image.open(dst / "day1/cam/car.png").format == "PNG"
    recs = {r["key"]: r for r in _records(tmp_path / "d.jsonl")}
    assert set(recs) == {"car.jpg", "day1/cam/car.png", "day1/empty_road.jpg"}
    for r in recs.values():
        assert RECORD_KEYS <= set(r)
        assert r["status"] in ("masked", "no_plate")
        assert r["model"]["name"] and len(r["model"]["weights_sha256"]) == 64
        assert len(r["input_sha256"]) == 64 and len(r["output_sha256"]) == 64
        for p in r["plates"]:
            assert len(p["box"]) == 4 and len(p["polygon"]) >= 3 and 0 <= p["score"] <= 1
            xs, ys = zip(*p["polygon"])
            assert 0 <= min(xs) and max(xs) <= r["width"] and 0 <= min(ys) and max(ys) <= r["height"]
    assert recs["car.jpg"]["status"] == "masked"
    assert recs["day1/empty_road.jpg"]["status"] == "no_plate"
    # the plate's true corners lie inside a reported polygon
    poly = np.asarray(recs["car.jpg"]["plates"][0]["polygon"], np.float32).reshape(-1, 1, 2)
    for x, y in quads[0]:
        assert cv2.pointPolygonTest(poly, (float(x), float(y)), True) > -4
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["by_status"] == {"masked": 2, "no_plate": 1, "failed": 0}
    for key in ("score_histogram", "plates_per_image", "review", "mask_area", "timings_s", "images_per_second",
                "model", "thresholds", "failures_by_reason"):
        assert key in report


def test_failures_exit_3_and_are_never_written(photo_dir, tmp_path, model_dir):
    src, _ = photo_dir
    good = (src / "car.jpg").read_bytes()
    (src / "zero.jpg").write_bytes(b"")
    (src / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "notes.txt").write_text("not an image")
    (src / "huge.png").write_bytes(png_bytes(np.zeros((1000, 1500, 3), np.uint8)))
    dst = tmp_path / "dst"
    rc = main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(tmp_path / "d.jsonl"),
               "--max-pixels", "1000000"])
    assert rc == 3
    recs = {r["key"]: r for r in _records(tmp_path / "d.jsonl")}
    assert len(recs) == 7  # every input accounted for
    expected = {"zero.jpg": "empty_file", "notes.txt": "not_an_image", "huge.png": "too_large"}
    for key, reason in expected.items():
        assert recs[key]["status"] == "failed" and recs[key]["reason"] == reason
        assert key in recs[key]["error"]
        assert not (dst / key).exists()
    assert recs["truncated.jpg"]["status"] == "failed" and not (dst / "truncated.jpg").exists()
    assert (dst / "car.jpg").exists()


def test_mask_modes_change_the_plate(photo_dir, tmp_path, model_dir):
    src, quads = photo_dir
    x0, y0 = np.floor(quads[0].min(0)).astype(int)
    x1, y1 = np.ceil(quads[0].max(0)).astype(int)
    orig = np.asarray(Image.open(src / "day1/cam/car.png"))[y0:y1, x0:x1].astype(int)
    for mode in ("pixelate", "solid"):
        dst = tmp_path / mode
        assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--mode", mode]) == 0
        out = np.asarray(Image.open(dst / "day1/cam/car.png"))[y0:y1, x0:x1].astype(int)
        assert np.abs(out - orig).mean() > 10


@pytest.mark.parametrize("argv", [
    ["mask"],
    ["mask", "a", "b", "--threshold", "1.5"],
    ["mask", "a", "b", "--mode", "swirl"],
    ["mask", "a", "b", "--batch-size", "0"],
])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_missing_source_and_same_folder_exit_2(tmp_path, model_dir):
    assert main(["mask", str(tmp_path / "nope"), str(tmp_path / "out"), "--model", str(model_dir)]) == 2
    (tmp_path / "x").mkdir()
    assert main(["mask", str(tmp_path / "x"), str(tmp_path / "x"), "--model", str(model_dir)]) == 2
    assert main(["mask", str(tmp_path / "x"), str(tmp_path / "y"), "--model", str(tmp_path / "no-model")]) == 2


def test_real_cli_subprocess_smoke(photo_dir, tmp_path, model_dir):
    """The installed entry point, as a user runs it: progress on stderr, exit code, output image."""
    src, _ = photo_dir
    proc = subprocess.run([sys.executable, "-m", "platemask.cli", "mask", str(src), str(tmp_path / "o"),
                           "--model", str(model_dir), "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stderr and "3/3 images" in proc.stderr
    assert (tmp_path / "o" / "car.jpg").stat().st_size > 1000


def test_max_pixels_is_bounded():
    from platemask.imageio import MAX_PIXELS_CEILING

    with pytest.raises(SystemExit) as e:
        main(["mask", "a", "b", "--max-pixels", str(MAX_PIXELS_CEILING + 1)])
    assert e.value.code == 2
    assert build_parser().parse_args(["mask", "a", "b", "--max-pixels", str(MAX_PIXELS_CEILING)]).max_pixels == MAX_PIXELS_CEILING


def test_detections_file_has_one_valid_record_per_input(tmp_path, model_dir):
    """Issue 12: on 300 small photos --detections held 298 valid records and lines of binary bytes
    (writer threads appended to one file at once)."""
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    n = 40  # the race itself is hammered in test_pipeline (no model there); this is the end-to-end check
    for i in range(n):
        (src / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        data = b"" if i % 13 == 0 else jpeg_bytes(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        (src / f"d{i % 5}" / f"p{i:03d}.jpg").write_bytes(data)
    det = tmp_path / "d.jsonl"
    rc = main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir), "--detections", str(det),
               "--batch-size", "8"])
    assert rc == 3  # the empty files
    text = det.read_text()  # strict UTF-8: binary garbage fails here
    recs = [json.loads(line) for line in text.splitlines()]
    assert len(recs) == n and len({r["key"] for r in recs}) == n
    assert sum(r["status"] == "failed" for r in recs) == len(range(0, n, 13))


def test_record_files_never_overwrite_originals_photos_or_each_other(photo_dir, tmp_path, model_dir):
    """--detections and --report inside SRC overwrote originals (one was emptied before it was
    read), inside DST were replaced by masked photos, and the same path for both lost the records:
    each is refused before anything is read or written."""
    src, _ = photo_dir
    (tmp_path / "dst").mkdir()
    name = sorted(p.name for p in src.iterdir())[0]
    before = _snapshot(src)
    for extra in (["--detections", str(src / name)],
                  ["--report", str(src / "sub" / "qa.json")],
                  ["--detections", str(tmp_path / "dst" / name)],
                  ["--detections", str(tmp_path / "r.json"), "--report", str(tmp_path / "." / "r.json")]):
        assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir), *extra]) == 2, extra
    assert _snapshot(src) == before
    assert not any((tmp_path / "dst").iterdir()) and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes")
def test_a_named_pipe_in_src_fails_alone_instead_of_hanging_the_job(tmp_path, model_dir, scene):
    """Reading a FIFO blocked until a writer came: the job hung with no record at all."""
    import os

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(scene[0]))
    os.mkfifo(src / "pipe.jpg")
    det = tmp_path / "d.jsonl"
    out = subprocess.run([sys.executable, "-m", "platemask.cli", "mask", str(src), str(tmp_path / "dst"),
                          "--model", str(model_dir), "--detections", str(det)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    recs = {r["key"]: r for r in _records(det)}
    assert set(recs) == {"a.jpg", "pipe.jpg"}
    assert recs["pipe.jpg"]["status"] == "failed" and "not a regular file" in recs["pipe.jpg"]["error"]
    assert recs["a.jpg"]["status"] != "failed"
    assert not (tmp_path / "dst" / "pipe.jpg").exists()


def test_a_rerun_removes_the_output_of_an_input_that_fails_now(tmp_path, model_dir, scene):
    """A photo masked by an earlier run, then replaced by a truncated file: the rerun's record says
    failed, and the old masked copy no longer sits in DST as if it belonged to this input."""
    src, dst, det = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl"
    src.mkdir()
    good = jpeg_bytes(scene[0])
    (src / "a.jpg").write_bytes(good)
    (src / "b.jpg").write_bytes(good)
    assert main(["mask", str(src), str(dst), "--model", str(model_dir)]) == 0
    assert (dst / "a.jpg").exists()
    (src / "a.jpg").write_bytes(good[: len(good) // 2])
    assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(det)]) == 3
    recs = {r["key"]: r for r in _records(det)}
    assert recs["a.jpg"]["status"] == "failed" and recs["a.jpg"]["stale_output_removed"] == str(dst / "a.jpg")
    assert not (dst / "a.jpg").exists() and (dst / "b.jpg").exists()
    assert "stale_output_removed" not in recs["b.jpg"]


def test_skipped_hidden_files_and_damaged_photos_are_named_with_what_to_do(tmp_path, model_dir, capsys):
    """A hidden file was left out without a word; a damaged photo's error named no remedy."""
    src = tmp_path / "src"
    src.mkdir()
    good = jpeg_bytes(np.full((64, 96, 3), 120, np.uint8))
    (src / ".hidden.jpg").write_bytes(good)
    (src / "cut.jpg").write_bytes(good[: len(good) // 2])
    (src / "empty.jpg").write_bytes(b"")
    det = tmp_path / "d.jsonl"
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir), "--detections", str(det)]) == 3
    err = capsys.readouterr().err
    assert "1 hidden file(s) skipped" in err and "'.hidden.jpg'" in err
    recs = {r["key"]: r for r in _records(det)}
    assert set(recs) == {"cut.jpg", "empty.jpg"}
    assert "upload the original again" in recs["cut.jpg"]["error"]
    assert "upload the photo again" in recs["empty.jpg"]["error"]


def test_a_linked_folder_is_named_as_not_followed_instead_of_dropped_silently(tmp_path, model_dir, capsys):
    """A link to a folder in SRC was passed over without a word: its photos got no record, no
    output and no mention, and the run said every file was masked."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    good = jpeg_bytes(np.full((64, 96, 3), 120, np.uint8))
    (outside / "a.jpg").write_bytes(good)
    src = tmp_path / "src"
    (src / "cars").mkdir(parents=True)
    (src / "cars" / "b.jpg").write_bytes(good)
    (src / "cars" / "more").symlink_to(outside, target_is_directory=True)
    report = tmp_path / "qa.json"
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir), "--report", str(report)]) == 0
    err = capsys.readouterr().err
    assert "1 link(s) to a folder not followed" in err and "NOT masked" in err and "'cars/more'" in err
    qa = json.loads(report.read_text())
    assert qa["skipped"] == {"hidden_files": [], "linked_folders_not_followed": ["cars/more"]}
    assert qa["images"] == 1
    assert not (tmp_path / "dst" / "cars" / "more").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGTERM,SIGINT", "SIGINT,SIGINT"])
def test_a_stopped_run_records_every_photo_it_published_and_says_it_stopped(tmp_path, model_dir, sig):
    """SIGTERM (what systemd, docker stop and kill send) killed the job on the spot: 20 masked photos
    in DST but 16 records in --detections (the rest still in a buffer), a half-written .tmp- file
    left, exit -15; Ctrl-C ended in a traceback and exit 1. Now both finish the photos in flight,
    each published photo has its record, and the exit code is 128 + the signal."""
    import os
    import signal
    import time

    src, dst, det = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl"
    src.mkdir()
    (tmp_path / "r.json").write_text('{"images": 400, "by_status": {"masked": 400, "no_plate": 0, "failed": 0}}')
    rng = np.random.default_rng(3)
    n = 400
    for i in range(n):
        (src / f"p{i:03d}.jpg").write_bytes(jpeg_bytes(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    proc = subprocess.Popen([sys.executable, "-m", "platemask.cli", "mask", str(src), str(dst), "--model", str(model_dir),
                             "--detections", str(det), "--report", str(tmp_path / "r.json"), "--batch-size", "2"],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not dst.is_dir() or len(list(dst.iterdir())) < 5):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        for i, name in enumerate(sig.split(",")):  # a second signal while the photos in flight finish
            time.sleep(0.3 * i)
            proc.send_signal(getattr(signal, name))
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig.split(",")[0]), err[-2000:]
    assert "interrupted" in err and "no report written" in err
    recs = _records(det)  # every line whole JSON
    published = sorted(p.name for p in dst.iterdir())
    assert not [p for p in published if p.startswith(".tmp-")]
    assert 5 <= len(published) < n
    assert sorted(r["key"] for r in recs if r["status"] != "failed") == published
    assert not (tmp_path / "r.json").exists()  # an earlier run's report never passes for this run's


def test_a_report_or_records_path_that_cannot_be_written_is_refused_before_any_photo(photo_dir, tmp_path, model_dir,
                                                                                   capsys):
    """--report in a folder that does not exist: every photo was masked and published, then a
    traceback, exit 1 and no summary line (nor the failed photos) in the log."""
    src, _ = photo_dir
    for extra in (["--report", str(tmp_path / "no" / "r.json")], ["--detections", str(tmp_path / "no" / "d.jsonl")],
                  ["--report", str(tmp_path)]):
        dst = tmp_path / "dst"
        assert main(["mask", str(src), str(dst), "--model", str(model_dir), *extra]) == 2, extra
        assert "cannot write" in capsys.readouterr().err
        assert not [p for p in dst.rglob("*") if p.is_file()]
    # the other file is checked before either is opened: an earlier run's records are not emptied
    old = tmp_path / "d.jsonl"
    old.write_text('{"key": "earlier.jpg"}\n')
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir), "--detections", str(old),
                 "--report", str(tmp_path / "no" / "r.json")]) == 2
    assert old.read_text() == '{"key": "earlier.jpg"}\n'


def test_a_file_name_cannot_forge_or_hide_log_lines(tmp_path, model_dir, capsys):
    """A damaged photo named ``x.jpg<newline>platemask: 9 images: 9 masked, 0 no plate, 0 failed ...``
    printed that name as its own log line after the real summary: a reviewer reading the log saw a
    clean run last. Terminal escapes in a name reached the terminal too."""
    src = tmp_path / "src"
    src.mkdir()
    good = jpeg_bytes(np.full((64, 96, 3), 120, np.uint8))
    forged = "platemask: 9 images: 9 masked, 0 no plate, 0 failed; 0 plates; 0 for review"
    (src / f"x.jpg\n{forged}").write_bytes(good[: len(good) // 2])
    (src / "y\x1b[2J\u202egpj.jpg").write_bytes(b"")
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir)]) == 3
    err = capsys.readouterr().err
    assert not [line for line in err.splitlines() if line.startswith(forged)]
    assert "\x1b" not in err and "\u202e" not in err
    assert "x.jpg\\u000aplatemask: 9 images" in err and "y\\u001b[2J\\u202egpj.jpg" in err


def test_a_key_with_invisible_characters_cannot_pass_for_another_in_the_log(tmp_path, model_dir, capsys):
    """A damaged upload named ``car<soft hyphen>0.jpg`` (or with a tag character, a no-break space)
    was logged as failing under what reads as ``car0.jpg``, the name of a photo that was masked: the
    log showed only line breaks, terminal escapes, bidi and zero-width characters as codes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "car0.jpg").write_bytes(jpeg_bytes(np.full((64, 96, 3), 120, np.uint8)))
    for name in ("car\u00ad0.jpg", "car\U000e00410.jpg", "car\u00a00.jpg"):
        (src / name).write_bytes(b"")
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir)]) == 3
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("platemask: failed")]
    assert len(failed) == 3 and not [line for line in failed if "car0.jpg" in line or not line.isascii()], failed
    for coded in ("/car\\u00ad0.jpg:", "/car\\U000e00410.jpg:", "/car\\u00a00.jpg:"):
        assert len([line for line in failed if coded in line]) == 1, (coded, failed)


def test_failures_past_the_logged_ones_are_counted_and_say_where_they_are_named(tmp_path, model_dir, capsys):
    """With 23 empty uploads the log named 20 and left 3 out without a word: the operator read 20
    failures where there were 23. The rest are now counted, with where each is named."""
    from platemask.cli import LOGGED_FAILURES_PER_REASON as shown

    src = tmp_path / "src"
    src.mkdir()
    for i in range(shown + 3):
        (src / f"empty{i:02d}.jpg").write_bytes(b"")
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir)]) == 3
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("platemask: failed (empty_file): ")]) == shown + 1
    assert "platemask: failed (empty_file): ... and 3 more not shown here: give --detections or --report" in err
    det = tmp_path / "d.jsonl"
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir), "--detections", str(det)]) == 3
    assert f"... and 3 more not shown here: each is named, with what went wrong, in {det}" in capsys.readouterr().err
    assert len(det.read_text().splitlines()) == shown + 3


def test_an_old_masked_copy_that_could_not_be_removed_is_named_in_the_log(tmp_path, model_dir, scene, capsys,
                                                                             monkeypatch):
    """A read-only DST on a rerun: the photo that failed now kept the earlier run's masked copy, and
    only its line in --detections said so (stale_output_not_removed); the log listed a plain failure."""
    from platemask.storage import LocalStore

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    good = jpeg_bytes(scene[0])
    (src / "a.jpg").write_bytes(good)
    assert main(["mask", str(src), str(dst), "--model", str(model_dir)]) == 0
    (src / "a.jpg").write_bytes(good[: len(good) // 2])
    capsys.readouterr()

    def read_only(self, key):
        raise PermissionError(30, "Read-only file system", str(self.root / key))

    monkeypatch.setattr(LocalStore, "delete", read_only)
    assert main(["mask", str(src), str(dst), "--model", str(model_dir)]) == 3
    err = capsys.readouterr().err
    assert (dst / "a.jpg").exists()
    assert "warning: a.jpg failed, but the masked copy an earlier run wrote for it could not be removed" in err
    assert "Read-only file system" in err


def test_a_records_file_hard_linked_to_an_original_leaves_the_original_alone(photo_dir, tmp_path, model_dir):
    """--detections at a name that is a hard link of a photo in SRC (a `cp -al` snapshot, rsync
    --link-dest) passed the inside-SRC check and was truncated in place: the original became the
    records file, and its own record said failed (empty_file)."""
    import os

    src, _ = photo_dir
    before = _snapshot(src)
    det, report = tmp_path / "d.jsonl", tmp_path / "r.json"
    os.link(src / "car.jpg", det)
    os.link(src / "day1" / "empty_road.jpg", report)
    assert main(["mask", str(src), str(tmp_path / "dst"), "--model", str(model_dir), "--detections", str(det),
                 "--report", str(report)]) == 0
    assert _snapshot(src) == before
    assert {r["key"] for r in _records(det)} == {"car.jpg", "day1/cam/car.png", "day1/empty_road.jpg"}
    assert json.loads(report.read_text())["images"] == 3


def test_a_model_that_cannot_run_here_is_refused_before_any_photo(photo_dir, tmp_path, model_dir, capsys, monkeypatch):
    """The warm-up pass at load is the model's first run: when it fails (out of GPU memory, a runtime
    error) the CLI ended in a traceback, exit 1. Now exit 2 with what failed and what to try, and
    nothing under DST."""
    from platemask.segment import Segmenter

    def fails(self, *a, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(Segmenter, "warm_up", fails)
    src, _ = photo_dir
    dst = tmp_path / "dst"
    assert main(["mask", str(src), str(dst), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "failed its first pass" in err and "CUDA out of memory" in err and "--device cpu" in err
    assert not [p for p in dst.rglob("*") if p.is_file()]


def test_a_rerun_stopped_part_way_leaves_no_published_photo_without_a_record(tmp_path, model_dir):
    """The same command run again and stopped (SIGTERM) part-way emptied --detections at its start: the
    earlier run's masked copies of the photos it had not reached yet stayed in DST with no record
    anywhere (400 copies, 208 records). Now those keep the earlier run's record, marked
    from_earlier_run; the photos the rerun did reach have its own; each published photo has one."""
    import os
    import signal
    import time

    src, dst, det = tmp_path / "src", tmp_path / "dst", tmp_path / "d.jsonl"
    src.mkdir()
    rng = np.random.default_rng(4)
    n = 200
    for i in range(n):
        (src / f"p{i:03d}.jpg").write_bytes(jpeg_bytes(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    cmd = [sys.executable, "-m", "platemask.cli", "mask", str(src), str(dst), "--model", str(model_dir),
           "--detections", str(det), "--batch-size", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(_records(det)) == n
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the rerun has emptied the file and recorded a few photos
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            if det.stat().st_size and 5 <= det.read_text().count("\n") < 50:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    recs = _records(det)
    keys = [r["key"] for r in recs]
    published = sorted(p.name for p in dst.iterdir())
    assert len(published) == n and sorted(keys) == published, (len(keys), len(set(keys)))  # one record each
    again = [r for r in recs if not r.get("from_earlier_run")]
    kept = [r for r in recs if r.get("from_earlier_run")]
    assert 5 <= len(again) < n and len(kept) == n - len(again), (len(again), len(kept))
    assert f"{len(kept)} of them keep the record an earlier run wrote" in err, err[-1500:]
