"""SRC and DST on S3, against moto's server on 127.0.0.1 (a real HTTP endpoint for boto3)."""
import json

import numpy as np
from PIL import Image
import io

from platemask.cli import main

from conftest import jpeg_bytes


def test_s3_to_s3(s3_env, scene, tmp_path, model_dir):
    s3 = s3_env
    s3.create_bucket(Bucket="photos")
    img, _, _ = scene
    s3.put_object(Bucket="photos", Key="raw/2026/11/20/car-1.jpg", Body=jpeg_bytes(img))
    s3.put_object(Bucket="photos", Key="raw/2026/11/20/broken.jpg", Body=b"\xff\xd8\xff garbage")
    s3.put_object(Bucket="photos", Key="raw/2026/11/21/road.jpg", Body=jpeg_bytes(np.full((200, 300, 3), 80, np.uint8)))
    s3.put_object(Bucket="photos", Key="elsewhere/x.jpg", Body=jpeg_bytes(img))
    rc = main(["mask", "s3://photos/raw", "s3://photos/masked/run1", "--model", str(model_dir),
               "--detections", str(tmp_path / "d.jsonl")])
    assert rc == 3  # the broken one
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="photos", Prefix="masked/")["Contents"])
    assert keys == ["masked/run1/2026/11/20/car-1.jpg", "masked/run1/2026/11/21/road.jpg"]
    body = s3.get_object(Bucket="photos", Key="masked/run1/2026/11/20/car-1.jpg")
    assert body["ContentType"] == "image/jpeg"
    assert Image.open(io.BytesIO(body["Body"].read())).size == (img.shape[1], img.shape[0])
    recs = {r["key"]: r for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines())}
    assert set(recs) == {"2026/11/20/car-1.jpg", "2026/11/20/broken.jpg", "2026/11/21/road.jpg"}
    assert recs["2026/11/20/car-1.jpg"]["status"] == "masked"
    assert recs["2026/11/20/broken.jpg"]["status"] == "failed"
    assert "s3://photos/raw/2026/11/20/broken.jpg" in recs["2026/11/20/broken.jpg"]["error"]
    # originals untouched
    assert s3.get_object(Bucket="photos", Key="raw/2026/11/20/car-1.jpg")["Body"].read() == jpeg_bytes(img)


def test_s3_local_mix(s3_env, scene, tmp_path, model_dir):
    s3 = s3_env
    s3.create_bucket(Bucket="mix")
    img, _, _ = scene
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(img))
    assert main(["mask", str(src), "s3://mix/out", "--model", str(model_dir)]) == 0
    assert s3.head_object(Bucket="mix", Key="out/a.jpg")["ContentLength"] > 0
    assert main(["mask", "s3://mix/out", str(tmp_path / "back"), "--model", str(model_dir)]) == 0
    assert (tmp_path / "back" / "a.jpg").exists()


def test_an_s3_object_whose_key_ends_in_a_slash_gets_a_record_unless_it_is_an_empty_folder_marker(s3_env, tmp_path,
                                                                                                   model_dir):
    """A console's folder marker (``x/``, 0 bytes) is no input; an object with bytes whose key ends in
    '/' is one (the DAG's collect keeps it too). The CLI's S3 listing dropped it without a record."""
    s3 = s3_env
    s3.create_bucket(Bucket="slashes")
    s3.put_object(Bucket="slashes", Key="raw/2026/11/20/", Body=b"")  # folder marker
    s3.put_object(Bucket="slashes", Key="raw/2026/11/20/notes/", Body=b"not a folder")
    s3.put_object(Bucket="slashes", Key="raw/2026/11/20/road.jpg", Body=jpeg_bytes(np.full((200, 300, 3), 80, np.uint8)))
    rc = main(["mask", "s3://slashes/raw", "s3://slashes/masked", "--model", str(model_dir),
               "--detections", str(tmp_path / "d.jsonl")])
    recs = {r["key"]: r for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines())}
    assert set(recs) == {"2026/11/20/notes/", "2026/11/20/road.jpg"}
    assert recs["2026/11/20/notes/"]["status"] == "failed" and recs["2026/11/20/road.jpg"]["status"] == "no_plate"
    assert rc == 3
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="slashes", Prefix="masked/")["Contents"])
    assert keys == ["masked/2026/11/20/road.jpg"]


def test_an_s3_object_larger_than_any_photo_is_refused_unread_by_the_cli(s3_env, tmp_path, model_dir, monkeypatch):
    """A local file larger than any image of --max-pixels can be is refused unread (too_large); one in
    an S3 source was read whole. The listing's size now refuses it the same way."""
    import platemask.pipeline as pipeline

    s3 = s3_env
    s3.create_bucket(Bucket="bigones")
    road = jpeg_bytes(np.full((200, 300, 3), 80, np.uint8))
    s3.put_object(Bucket="bigones", Key="raw/road.jpg", Body=road)
    s3.put_object(Bucket="bigones", Key="raw/disk.img", Body=b"\0" * (len(road) * 4))
    monkeypatch.setattr(pipeline, "max_file_bytes", lambda max_pixels: len(road) * 2)
    gets: list[str] = []
    import boto3

    real_client = boto3.client

    def counting_client(*a, **kw):
        c = real_client(*a, **kw)
        c.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: gets.append(params["Key"]))
        return c

    monkeypatch.setattr(boto3, "client", counting_client)
    rc = main(["mask", "s3://bigones/raw", "s3://bigones/masked", "--model", str(model_dir),
               "--detections", str(tmp_path / "d.jsonl")])
    recs = {r["key"]: r for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines())}
    assert rc == 3 and recs["disk.img"]["reason"] == "too_large" and recs["road.jpg"]["status"] == "no_plate"
    assert "raw/disk.img" not in gets and "raw/road.jpg" in gets
