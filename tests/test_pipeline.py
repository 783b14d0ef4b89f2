"""Pipeline mechanics with a test double for the detector (the real model is tested in test_model.py)."""
import os
import sys

import numpy as np
import pytest

from platemask.detections import Plate
from platemask.geometry import box_polygon
from platemask.imageio import ImageError, decode
from platemask.pipeline import GPU_BATCHES_IN_FLIGHT, GPU_SWITCH_INTERVAL_MS, JobOptions, Progress, run_job
from platemask.storage import LocalStore

from conftest import jpeg_bytes


def _store(tmp_path, n=7, bad=()):
    src = LocalStore(tmp_path / "src", create=True)
    for i in range(n):
        src.write(f"p{i}.jpg", b"" if i in bad else jpeg_bytes(np.full((100, 200, 3), 20 * i, np.uint8)))
    return src


def _fixed(score):
    def detect(keys, decoded):
        return [[Plate(score, box_polygon([50, 40, 120, 60]))] for _ in keys]
    return detect


def test_every_key_gets_one_record_in_order(tmp_path):
    src, dst = _store(tmp_path, bad=(3,)), LocalStore(tmp_path / "dst", create=True)
    keys = list(src.iter_keys())
    recs = run_job(src, dst, keys, _fixed(0.9), JobOptions(batch_size=3))
    assert [r["key"] for r in recs] == keys
    assert [r["status"] for r in recs].count("failed") == 1
    assert sorted(dst.iter_keys()) == [k for k in keys if k != "p3.jpg"]


def test_threshold_review_band(tmp_path):
    src, dst = _store(tmp_path, n=1), LocalStore(tmp_path / "dst", create=True)
    opts = JobOptions(threshold=0.5, review_low=0.2, review_high=0.8)
    near = run_job(src, dst, ["p0.jpg"], _fixed(0.3), opts)[0]
    assert near["status"] == "no_plate" and near["review"] and len(near["near_misses"]) == 1
    weak = run_job(src, dst, ["p0.jpg"], _fixed(0.6), opts)[0]
    assert weak["status"] == "masked" and weak["review"]
    sure = run_job(src, dst, ["p0.jpg"], _fixed(0.95), opts)[0]
    assert sure["status"] == "masked" and not sure["review"]
    low = run_job(src, dst, ["p0.jpg"], _fixed(0.1), opts)[0]
    assert low["status"] == "no_plate" and not low["review"]
    from platemask.qa import build_report

    review = build_report([near, weak, sure, low])["review"]["items"]
    assert [(r["scores"], r["near_miss_scores"]) for r in review] == [([], [0.3]), ([0.6], [])]


def test_review_flags_unusual_results_and_records_calibrated_probabilities(tmp_path):
    src, dst = _store(tmp_path, n=1), LocalStore(tmp_path / "dst", create=True)
    opts = JobOptions(threshold=0.5, review_low=0.4, review_high=0.6, calibration=((0.0, 0.0), (0.5, 0.3), (1.0, 0.9)))
    # a confident detection covering most of the 200x100 photo: masked, but a human should look
    huge = run_job(src, dst, ["p0.jpg"], lambda k, d: [[Plate(0.95, box_polygon([5, 5, 195, 95]))] for _ in k], opts)[0]
    assert huge["status"] == "masked" and huge["review"] and "of the photo" in huge["review_reason"]
    many = run_job(src, dst, ["p0.jpg"], lambda k, d: [[Plate(0.95, box_polygon([10 * i, 0, 10 * i + 4, 3]))
                                                          for i in range(8)] for _ in k], opts)[0]
    assert many["review"] and "8 masks" in many["review_reason"]
    sure = run_job(src, dst, ["p0.jpg"], _fixed(0.75), opts)[0]
    assert not sure["review"] and sure["plates"][0]["p_plate"] == pytest.approx(0.6)


def test_options_for_a_model_take_its_review_band_and_calibration():
    from platemask.model import ModelConfig

    cfg = ModelConfig(name="m", score_threshold=0.3, review_low=0.2, review_high=0.5, calibration=[[0, 0], [1, 1]])
    assert (JobOptions.for_model(cfg).threshold, JobOptions.for_model(cfg).review_low) == (0.3, 0.2)
    run = JobOptions.for_model(cfg, 0.6)  # a run above the model's band still reviews its weak masks
    assert (run.threshold, run.review_low, run.review_high, run.calibration) == (0.6, 0.2, 0.6, ((0, 0), (1, 1)))


def test_detector_crash_fails_closed(tmp_path):
    src, dst = _store(tmp_path, n=5), LocalStore(tmp_path / "dst", create=True)

    def boom(keys, decoded):
        raise RuntimeError("CUDA out of memory")

    recs = run_job(src, dst, list(src.iter_keys()), boom, JobOptions(batch_size=2))
    assert all(r["status"] == "failed" and r["reason"] == "detector_error" for r in recs)
    assert "CUDA out of memory" in recs[0]["error"]
    assert list(dst.iter_keys()) == []


def test_per_image_detector_errors(tmp_path):
    """A backend that has no result for one image (SageMaker's missing .out) fails only that image."""
    src, dst = _store(tmp_path, n=3), LocalStore(tmp_path / "dst", create=True)

    def partial(keys, decoded):
        return [ImageError("no_output", f"no output for {k}") if k == "p1.jpg" else [] for k in keys]

    recs = run_job(src, dst, list(src.iter_keys()), partial, JobOptions())
    assert [r["status"] for r in recs] == ["no_plate", "failed", "no_plate"]
    assert recs[1]["reason"] == "no_output" and sorted(dst.iter_keys()) == ["p0.jpg", "p2.jpg"]


def test_write_error_fails_that_image(tmp_path):
    src = _store(tmp_path, n=3)

    class Flaky(LocalStore):
        def write(self, key, data, content_type="application/octet-stream"):
            if key == "p2.jpg":
                raise OSError("disk full")
            super().write(key, data, content_type)

    dst = Flaky(tmp_path / "dst", create=True)
    recs = run_job(src, dst, list(src.iter_keys()), _fixed(0.9), JobOptions())
    assert recs[2]["status"] == "failed" and recs[2]["reason"] == "write_error" and "disk full" in recs[2]["error"]
    assert recs[0]["status"] == "masked"


def test_progress_line():
    lines = []
    p = Progress(4, every=0, emit=lines.append)
    for s in ("masked", "failed", "no_plate", "masked"):
        p.update(s)
    assert len(lines) == 4 and lines[-1].startswith("4/4 images") and "1 failed" in lines[-1]


def test_options_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        JobOptions(threshold=1.5)
    with pytest.raises(ValueError, match="metadata"):
        JobOptions(metadata="all")


@pytest.mark.parametrize("write_delay", [0.0, 0.004], ids=["fast_store", "slow_store"])
def test_records_reach_on_record_one_at_a_time(tmp_path, write_delay):
    """Issue 12: the CLI appends each record to one text file from ``on_record``; called from several
    writer threads at once, that file got lost records and binary garbage. Records are emitted one at a time."""
    import json
    import random
    import threading
    import time

    n = 240
    src = LocalStore(tmp_path / "src", create=True)
    tiny = jpeg_bytes(np.full((8, 8, 3), 128, np.uint8))
    for i in range(n):
        src.write(f"d{i % 7}/p{i:03d}.jpg", b"" if i % 37 == 0 else tiny)  # some failures come from the main thread
    rng = random.Random(0)

    class Store(LocalStore):
        def write(self, key, data, content_type="application/octet-stream"):
            time.sleep(write_delay * rng.random())
            super().write(key, data, content_type)

    dst = Store(tmp_path / "dst", create=True)
    inside, most = [0], [0]
    guard = threading.Lock()
    jsonl = tmp_path / "d.jsonl"
    with open(jsonl, "w") as f:
        def on_record(rec):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            f.write(json.dumps(rec) + "\n")  # what the CLI does
            time.sleep(0.0005)  # a slow consumer widens any race
            with guard:
                inside[0] -= 1

        lines = []
        progress = Progress(n, every=0, emit=lines.append)
        keys = list(src.iter_keys())
        recs = run_job(src, dst, keys, _fixed(0.9), JobOptions(batch_size=5, read_workers=8, write_workers=8),
                       on_record=on_record, progress=progress)
    assert most[0] == 1, f"on_record ran {most[0]} times at once"
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(r["key"] for r in written) == sorted(keys) and len(recs) == n
    assert progress.done == n and len(lines) == n and lines[-1].startswith(f"{n}/{n} images")
    assert progress.failed == sum(r["status"] == "failed" for r in written) == len(range(0, n, 37))


def test_mpo_is_masked_as_jpeg_and_the_dropped_frames_are_recorded(tmp_path):
    import io

    from PIL import Image

    def frames():  # fresh images per save: Pillow keeps one save's encoder settings on the image
        return [Image.new("RGB", (200, 100), (v, v, v)) for v in (60, 120)]

    first, *rest = frames()
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=rest)
    src, dst = LocalStore(tmp_path / "src", create=True), LocalStore(tmp_path / "dst", create=True)
    src.write("phone.jpg", buf.getvalue())
    tiff = io.BytesIO()
    first, *rest = frames()
    first.save(tiff, format="TIFF", save_all=True, append_images=rest)
    src.write("scan.tif", tiff.getvalue())
    phone, scan = run_job(src, dst, ["phone.jpg", "scan.tif"], _fixed(0.9), JobOptions())
    assert phone["status"] == "masked" and phone["frames_dropped"] == 1 and "MPO" in phone["note"]
    out = Image.open(tmp_path / "dst" / "phone.jpg")
    assert out.format == "JPEG" and getattr(out, "n_frames", 1) == 1
    assert scan["status"] == "failed" and scan["reason"] == "multi_page_unsupported" and "scan.tif" in scan["error"]
    assert sorted(dst.iter_keys()) == ["phone.jpg"]


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_reading_and_writing_threads_yield_the_cpu_to_the_detector(tmp_path):
    """Decode and encode threads run at a lower priority than the thread that runs the detector."""
    import os
    import threading

    from platemask.pipeline import IO_THREAD_NICE, JobOptions, run_job
    from platemask.storage import open_store

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"p{i}.jpg").write_bytes(jpeg_bytes(np.full((40, 60, 3), 90 + i, np.uint8)))
    seen: dict[str, int] = {}

    def detect(keys, decoded):
        seen["detector"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return [[] for _ in keys]

    import platemask.pipeline as pipeline
    real_decode = pipeline.decode

    def spy(data, **kw):
        seen["reader"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return real_decode(data, **kw)

    pipeline.decode = spy
    try:
        recs = run_job(open_store(str(src)), open_store(str(tmp_path / "dst"), create=True), sorted(os.listdir(src)),
                       detect, JobOptions(threshold=0.5))
    finally:
        pipeline.decode = real_decode
    assert [r["status"] for r in recs] == ["no_plate"] * 3
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen["detector"] == base
    assert seen["reader"] == min(19, base + IO_THREAD_NICE)


def test_device_options_one_rule_for_cli_and_dag_workers(monkeypatch):
    """Readers as asked and half as many writers (at least 2); unasked, the CPU defaults stay and a
    GPU host gets 8 + 4 (more threads slowed a GPU run: they compete for the interpreter lock), room
    for GPU_BATCHES_IN_FLIGHT batches of 1280 x 720 photos in the pixel budget and a short switch
    interval. A budget one batch fills (the old 512 MB held 190 such photos, under one batch of
    256) left the readers waiting while the GPU and the writers worked, so nothing overlapped."""
    import platemask.pipeline as pipeline

    monkeypatch.setattr(pipeline, "memory_limit_bytes", lambda: 128 << 30)  # a GPU host (the cap: next test)
    assert JobOptions.for_device("cpu") == {}
    assert JobOptions.for_device("auto", 3) == {"read_workers": 3, "write_workers": 2}
    gpu = JobOptions.for_device("cuda", batch_size=256)
    assert (gpu["read_workers"], gpu["write_workers"]) == (8, 4)
    assert gpu["pixel_budget_mb"] * 2**20 >= GPU_BATCHES_IN_FLIGHT * 256 * 1280 * 720 * 3
    assert gpu["switch_interval_ms"] == GPU_SWITCH_INTERVAL_MS < 5
    assert JobOptions.for_device("cuda:1", 16)["read_workers"] == 16
    assert JobOptions.for_device("cuda:1", 16)["write_workers"] == 8
    assert JobOptions.for_device("cuda", batch_size=1)["pixel_budget_mb"] == JobOptions.pixel_budget_mb  # never less
    opts = JobOptions(**gpu)
    assert (opts.read_workers, opts.write_workers, opts.pixel_budget_mb) == (8, 4, gpu["pixel_budget_mb"])


def test_the_gpu_budget_stays_a_share_of_the_memory_the_process_may_use(monkeypatch):
    """Peak memory is 2-3x the pixel budget: a large batch must not size it past what the machine
    (or the container's cgroup) has; the default budget is the floor."""
    import platemask.pipeline as pipeline

    monkeypatch.setattr(pipeline, "memory_limit_bytes", lambda: 16 << 30)  # e.g. an ml.g5.xlarge
    big = JobOptions.for_device("cuda", batch_size=4096)["pixel_budget_mb"]
    assert isinstance(big, int) and big == int((16 << 30) * pipeline.GPU_BUDGET_MEMORY_SHARE) // 2**20
    monkeypatch.setattr(pipeline, "memory_limit_bytes", lambda: 1 << 30)
    assert JobOptions.for_device("cuda", batch_size=4096)["pixel_budget_mb"] == JobOptions.pixel_budget_mb
    monkeypatch.undo()
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < pipeline.memory_limit_bytes() <= physical


def test_switch_interval_holds_while_the_job_runs_and_is_restored(tmp_path):
    """The job's switch interval is what its threads see, and the interpreter's own comes back
    after the job, also when the job fails."""
    before = sys.getswitchinterval()
    seen = []
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(np.zeros((32, 32, 3), np.uint8)))

    def detect(keys, decoded):
        seen.append(sys.getswitchinterval())
        return [[] for _ in decoded]

    opts = JobOptions(switch_interval_ms=0.25)
    run_job(LocalStore(src), LocalStore(tmp_path / "dst", create=True), ["a.jpg"], detect, opts)
    assert seen == [pytest.approx(0.00025)]
    assert sys.getswitchinterval() == before

    def boom(keys, decoded):
        raise KeyboardInterrupt  # not an image error: the job itself stops

    with pytest.raises(KeyboardInterrupt):
        run_job(LocalStore(src), LocalStore(tmp_path / "dst2", create=True), ["a.jpg"], boom, opts)
    assert sys.getswitchinterval() == before
    with pytest.raises(ValueError, match="switch_interval_ms"):
        JobOptions(switch_interval_ms=0)


def test_a_decoder_surprise_fails_that_photo_alone(tmp_path, monkeypatch):
    """Anything the decoder raises besides its own ImageError (a hostile file hit a path nobody
    caught: a text EXIF Orientation raised ValueError) left the whole shard without records."""
    import platemask.pipeline as pipeline

    real = pipeline.decode

    def decode(data, **kw):
        if data.startswith(b"BOOM"):
            raise ValueError("invalid literal for int() with base 10: 'abc'")
        return real(data, **kw)

    monkeypatch.setattr(pipeline, "decode", decode)
    src, dst = _store(tmp_path, n=4), LocalStore(tmp_path / "dst", create=True)
    src.write("p1.jpg", b"BOOM" + jpeg_bytes(np.full((10, 10, 3), 9, np.uint8)))
    keys = list(src.iter_keys())
    recs = run_job(src, dst, keys, _fixed(0.9), JobOptions(batch_size=2))
    assert [r["key"] for r in recs] == keys
    assert [r["status"] for r in recs] == ["masked", "failed", "masked", "masked"]
    assert recs[1]["reason"] == "corrupt" and "ValueError" in recs[1]["error"] and "re-export" in recs[1]["error"]
    assert sorted(dst.iter_keys()) == ["p0.jpg", "p2.jpg", "p3.jpg"]


def test_a_header_that_trips_a_pillow_plugin_fails_that_file_alone(tmp_path):
    """A 3 KB file (named .jpg) that Pillow's DDS plugin claims and then raises NotImplementedError
    on (SPIDER's raises AttributeError) escaped the header read that sizes a photo's memory, before
    the decoder's own guard: the whole run stopped with a traceback, no record for any photo."""
    import struct

    dds = (b"DDS " + struct.pack("<7I", 124, 0x1007, 24, 32, 0, 0, 0) + b"\0" * 44
           + struct.pack("<2I4s5I", 32, 1, b"\0\0\0\0", 32, 0, 0, 0, 0)  # pixel format flags 1: none Pillow knows
           + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + b"\0" * 3072)
    src, dst = _store(tmp_path, n=4), LocalStore(tmp_path / "dst", create=True)
    src.write("p1.jpg", dds)
    keys = list(src.iter_keys())
    recs = run_job(src, dst, keys, _fixed(0.9), JobOptions(batch_size=2))
    assert [r["key"] for r in recs] == keys
    assert [r["status"] for r in recs] == ["masked", "failed", "masked", "masked"]
    assert recs[1]["reason"] == "corrupt" and "NotImplementedError" in recs[1]["error"]
    assert sorted(dst.iter_keys()) == ["p0.jpg", "p2.jpg", "p3.jpg"]
    with pytest.raises(ImageError) as e:  # decode itself raises its own error, whoever calls it
        decode(dds)
    assert e.value.reason == "corrupt"


def test_a_file_larger_than_any_allowed_image_fails_unread(tmp_path):
    """A 1.5 GB video in the folder was read whole before the decoder said 'not an image' (peak RSS
    2.5 GB for one file; 8 reading threads hold 8 of them): a folder with a few took more memory than
    the machine had and the kernel killed the run, every record after it lost."""
    from platemask.imageio import max_file_bytes

    src, dst = _store(tmp_path, n=2), LocalStore(tmp_path / "dst", create=True)
    opts = JobOptions(max_pixels=1_000_000)
    with open(tmp_path / "src" / "clip.jpg", "wb") as f:  # sparse: no disk used
        f.truncate(max_file_bytes(opts.max_pixels) + 1)
    read = []

    class Spy(LocalStore):
        def read(self, key):
            read.append(key)
            return super().read(key)

    recs = {r["key"]: r for r in run_job(Spy(tmp_path / "src"), dst, ["clip.jpg", "p0.jpg", "p1.jpg"], _fixed(0.9), opts)}
    assert recs["clip.jpg"]["status"] == "failed" and recs["clip.jpg"]["reason"] == "too_large"
    assert "not read" in recs["clip.jpg"]["error"]
    assert sorted(read) == ["p0.jpg", "p1.jpg"]
    assert recs["p0.jpg"]["status"] == recs["p1.jpg"]["status"] == "masked"
    assert max_file_bytes(80_000_000) > 80_000_000 * 8  # an uncompressed 16-bit RGBA 80 MP image still fits
