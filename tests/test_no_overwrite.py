"""Issue 12, 'nothing lost': originals are never overwritten, two inputs never share one output,
and written files get ordinary permissions."""
import json
import os
import stat

import numpy as np
import pytest

from platemask.cli import main
from platemask.pipeline import JobOptions, run_job
from platemask.storage import LocalStore, normalise_key, overlap

from conftest import jpeg_bytes


@pytest.mark.parametrize("src,dst", [
    ("same", "same/."), ("same", "./same/"), ("same", "same/../same"), ("a/b", "a/b/masked"), ("a/b/c", "a/b"),
    ("s3://b/raw", "s3://b//raw"), ("s3://b/raw", "s3://b/raw/"), ("s3://b/raw", "s3://b/./raw"),
    ("s3://b/raw", "s3://b/raw/masked"), ("s3://b/raw/2026", "s3://b/raw"), ("s3://b", "s3://b/masked"),
])
def test_same_or_nested_places_overlap(src, dst, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert overlap(src, dst) and overlap(dst, src)


@pytest.mark.parametrize("src,dst", [
    ("raw", "raw2"), ("a/b", "a/c"), ("s3://b/raw", "s3://b/raw2"), ("s3://b/raw", "s3://c/raw"), ("s3://b/raw", "raw"),
])
def test_separate_places_do_not_overlap(src, dst, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert overlap(src, dst) is None


def test_overlap_follows_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert overlap(str(tmp_path / "real"), str(tmp_path / "link" / "out"))


@pytest.mark.parametrize("key,norm", [
    ("a/../b.jpg", "b.jpg"), ("x//y.jpg", "x/y.jpg"), ("/abs/z.jpg", "abs/z.jpg"), ("./c.jpg", "c.jpg"), ("d.jpg", "d.jpg"),
])
def test_normalise_key(key, norm):
    assert normalise_key(key) == norm


@pytest.mark.parametrize("key", ["../up.jpg", "a/../../up.jpg", "", "/", "a/.."])
def test_normalise_key_refuses_escapes(key):
    with pytest.raises(ValueError):
        normalise_key(key)


def test_same_folder_twice_is_refused_and_untouched(tmp_path, model_dir, monkeypatch):
    """``platemask mask same same/.`` passed a string comparison and rewrote the originals."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "same").mkdir()
    orig = jpeg_bytes(np.full((40, 60, 3), 90, np.uint8))
    (tmp_path / "same" / "a.jpg").write_bytes(orig)
    before = os.stat(tmp_path / "same" / "a.jpg")
    for dst in ("same/.", "same/", str(tmp_path / "same"), "same/masked"):
        assert main(["mask", "same", dst, "--model", str(model_dir)]) == 2, dst
    assert (tmp_path / "same" / "a.jpg").read_bytes() == orig
    assert os.stat(tmp_path / "same" / "a.jpg").st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["a.jpg"]


def test_s3_double_slash_is_the_same_prefix(s3_env, model_dir, capsys):
    """``s3://b/raw`` -> ``s3://b//raw`` wrote onto the originals."""
    s3 = s3_env
    s3.create_bucket(Bucket="same")
    orig = jpeg_bytes(np.full((40, 60, 3), 90, np.uint8))
    s3.put_object(Bucket="same", Key="raw/a.jpg", Body=orig)
    etag = s3.head_object(Bucket="same", Key="raw/a.jpg")["ETag"]
    assert main(["mask", "s3://same/raw", "s3://same//raw", "--model", str(model_dir)]) == 2
    assert "same place" in capsys.readouterr().err
    assert s3.head_object(Bucket="same", Key="raw/a.jpg")["ETag"] == etag
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="same")["Contents"]] == ["raw/a.jpg"]


def test_s3_keys_that_collide_locally_are_all_accounted_for(s3_env, tmp_path, model_dir):
    """S3 keys ``a/../b.jpg`` and ``b.jpg`` (or ``x//y.jpg`` and ``x/y.jpg``) wrote one local file: 12 records said
    masked, 10 files existed. Now both sides of a collision fail with each other's name and nothing is overwritten."""
    s3 = s3_env
    s3.create_bucket(Bucket="odd")
    keys = ["a/../b.jpg", "b.jpg", "x//y.jpg", "x/y.jpg", "../up.jpg"] + [f"ok/{i}.jpg" for i in range(7)]
    for i, k in enumerate(keys):
        s3.put_object(Bucket="odd", Key="raw/" + k, Body=jpeg_bytes(np.full((40, 60, 3), 10 * i, np.uint8)))
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="odd", Prefix="raw/")["Contents"])
    assert listed == sorted("raw/" + k for k in keys)  # S3 keeps the odd keys as they are
    dst = tmp_path / "out"
    rc = main(["mask", "s3://odd/raw", str(dst), "--model", str(model_dir), "--detections", str(tmp_path / "d.jsonl")])
    assert rc == 3
    recs = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in recs) == sorted(keys)  # one record per input
    by = {r["key"]: r for r in recs}
    for a, b in (("a/../b.jpg", "b.jpg"), ("x//y.jpg", "x/y.jpg")):
        for k, other in ((a, b), (b, a)):
            assert by[k]["status"] == "failed" and by[k]["reason"] == "output_collision"
            assert repr(other) in by[k]["error"] and f"s3://odd/raw/{k}" in by[k]["error"]
    assert by["../up.jpg"]["status"] == "failed" and by["../up.jpg"]["reason"] == "unsafe_key"
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert written == [f"ok/{i}.jpg" for i in range(7)]
    assert sum(r["status"] != "failed" for r in recs) == len(written)  # every success is its own file
    assert not (tmp_path / "up.jpg").exists()


def test_run_job_refuses_colliding_and_escaping_keys_before_reading(tmp_path):
    src = LocalStore(tmp_path / "src", create=True)
    for k in ("b.jpg", "a/c.jpg"):
        src.write(k, jpeg_bytes(np.full((20, 30, 3), 50, np.uint8)))
    read = []

    class Spy(LocalStore):
        def read(self, key):
            read.append(key)
            return super().read(key)

    spy = Spy(tmp_path / "src")
    dst = LocalStore(tmp_path / "dst", create=True)
    keys = ["b.jpg", "a/../b.jpg", "a/c.jpg", "a/../../src/b.jpg"]
    recs = run_job(spy, dst, keys, lambda k, d: [[] for _ in k], JobOptions())
    assert [r["key"] for r in recs] == keys
    assert [r.get("reason") for r in recs] == ["output_collision", "output_collision", None, "unsafe_key"]
    assert read == ["a/c.jpg"] and sorted(dst.iter_keys()) == ["a/c.jpg"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Outputs were 0600 (the temp file's mode) where the originals were 0644."""
    old = os.umask(umask)
    try:
        store = LocalStore(tmp_path / "dst", create=True)
        store.write("d/a.jpg", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "dst" / "d" / "a.jpg").st_mode) == 0o666 & ~umask


def test_a_collision_removes_the_masked_copy_an_earlier_run_left_at_its_output(tmp_path):
    """``b.jpg`` masked by a run, then ``a/../b.jpg`` uploaded beside it: both failed output_collision
    on the rerun, but the first run's ``b.jpg`` stayed in DST beside two records saying failed."""
    src = LocalStore(tmp_path / "src", create=True)
    src.write("b.jpg", jpeg_bytes(np.full((20, 30, 3), 50, np.uint8)))
    dst = LocalStore(tmp_path / "dst", create=True)
    opts = JobOptions(remove_stale_outputs=True)
    assert run_job(src, dst, ["b.jpg"], lambda k, d: [[] for _ in k], opts)[0]["status"] == "no_plate"
    assert dst.exists("b.jpg")
    recs = run_job(src, dst, ["b.jpg", "a/../b.jpg"], lambda k, d: [[] for _ in k], opts)
    assert [r["reason"] for r in recs] == ["output_collision", "output_collision"]
    assert not dst.exists("b.jpg")
    assert [r.get("stale_output_removed") for r in recs] == [dst.describe("b.jpg"), None]
