from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "platemask-mnv2-fpn"
# Airflow reads its configuration when first imported: point it at a throw-away home first.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="platemask-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")

REAL_DATA = Path(os.environ.get("PLATEMASK_REAL_DATA", ROOT.parent / "shared" / "datasets" / "plates-real-v1"))


def jpeg_bytes(rgb: np.ndarray, quality: int = 92, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    assert (MODEL_DIR / "config.json").is_file(), f"shipped model missing at {MODEL_DIR}"
    return MODEL_DIR


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "annotations.json").is_file():
        pytest.skip(f"real data set not present at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def scene():
    """A generated 1280x720 car photo with two readable plates and their true corners."""
    from platemask.training.synth import synth_car_scene

    rng = np.random.default_rng(7)
    img, quads, texts = synth_car_scene(rng, n_plates=1, plate_width=(150, 170))
    return img, quads, texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server), shared by the session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """boto3 configured for the moto server through the environment, as the CLI sees it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    return client


@pytest.fixture
def aws_conn(s3_env, moto_server, monkeypatch):
    """The Airflow AWS connection (``aws_default``) pointing at the moto server; returns the S3 client."""
    import json

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"}}))
    return s3_env


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated SQLite metadata database in the throw-away AIRFLOW_HOME."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, timeout=300)
    return os.environ["AIRFLOW_HOME"]


def exif_orientation_jpeg(typ: int, count: int, value4: bytes, size=(96, 64)) -> bytes:
    """A JPEG whose EXIF Orientation (tag 274) has TIFF type ``typ`` (2 = text, 3 = short, 5 =
    rational ...), ``count`` values and the 4 inline bytes ``value4``: what a hostile or broken
    camera writes, which Pillow hands back as a str, a tuple or an odd number."""
    import struct

    ifd = struct.pack("<H", 1) + struct.pack("<HHI", 274, typ, count) + value4 + struct.pack("<I", 0)
    blob = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG", exif=blob)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server_url(model_dir):
    """The real container server (gunicorn, 2 workers, the model's threshold, 6 MB payload limit)."""
    from platemask.local_transform import wait_ready

    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="2",
               PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_DEVICE="cpu")
    for name in ("PLATEMASK_THRESHOLD", "SAGEMAKER_MAX_PAYLOAD_IN_MB", "PLATEMASK_SERVER_THREADS",
                 "SAGEMAKER_MODEL_SERVER_TIMEOUT"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def write_tiny_coco(root: Path, n: int = 8, n_neg: int = 2, seed: int = 0) -> Path:
    """A tiny generated COCO set under ``root``: ``n`` 320x240 car photos, the last ``n_neg`` of them
    negatives (no plate), the others one plate each (boxes and outlines)."""
    import json

    import cv2

    from platemask.training.synth import synth_car_scene

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        negative = i >= n - n_neg
        img, quads, _ = synth_car_scene(rng, size=(240, 320), n_plates=0 if negative else 1, plate_width=(40, 60))
        name = f"images/{i}.jpg"
        cv2.imwrite(str(root / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rec = {"id": i + 1, "file_name": name, "width": 320, "height": 240, "sha1": f"img{i}"}
        if negative:
            rec["negative"] = True
        images.append(rec)
        for q in quads:
            x0, y0 = q.min(0)
            x1, y1 = q.max(0)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "segmentation": [q.reshape(-1).tolist()]})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "plate"}]}))
    return root


def torch_save_then_disk_full(obj, f, *a, **k):
    """A stand-in for ``torch.save`` that writes the start of a file and then fails as a full disk does."""
    with open(f, "wb") as fh:
        fh.write(b"PK\x03\x04 partial")
    raise OSError(28, "No space left on device")


def without_root_file_override(cmd: list[str]) -> list[str]:
    """``cmd`` run so that file permissions bind it: as root (which lists and reads any folder), under
    setpriv without the capabilities that override them; skips the test when setpriv is missing."""
    import shutil

    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run without root's file-permission override")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
