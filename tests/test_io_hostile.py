"""Hostile inputs at the I/O edges: links, pipes and unlistable folders in a LocalStore, and photos
that carry a second, unmasked copy of themselves (thumbnails, MPF frames, hidden APNG frames)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, without_root_file_override
from platemask.storage import LocalStore


def test_local_writes_and_deletes_replace_a_link_never_what_it_leads_to(tmp_path):
    """DST holding a.jpg -> b.jpg (a dedupe tool's link) and c.jpg -> ../outside.jpg: writing a.jpg
    overwrote b.jpg through the link, deleting c.jpg's stale copy deleted b.jpg, and a link leading
    out of DST made its key 'escape' (the photo failed). The link itself is replaced or removed."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "b.jpg").write_bytes(b"b's own masked copy")
    (tmp_path / "outside.jpg").write_bytes(b"not in DST")
    os.symlink("b.jpg", dst / "a.jpg")
    os.symlink("b.jpg", dst / "c.jpg")
    os.symlink("../outside.jpg", dst / "d.jpg")
    store = LocalStore(dst)
    store.write("a.jpg", b"a's new masked copy")
    store.delete("c.jpg")
    store.write("d.jpg", b"d's masked copy")
    assert (dst / "b.jpg").read_bytes() == b"b's own masked copy"
    assert (tmp_path / "outside.jpg").read_bytes() == b"not in DST"
    assert not (dst / "a.jpg").is_symlink() and (dst / "a.jpg").read_bytes() == b"a's new masked copy"
    assert not os.path.lexists(dst / "c.jpg")
    assert not (dst / "d.jpg").is_symlink() and (dst / "d.jpg").read_bytes() == b"d's masked copy"
    # a folder link in the middle of a key still may not lead out of DST
    os.symlink(str(tmp_path), dst / "up")
    with pytest.raises(ValueError, match="escapes"):
        store.write("up/x.jpg", b"x")
    with pytest.raises(ValueError):
        store.write("..", b"x")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_local_read_refuses_a_pipe_before_opening_it(tmp_path, monkeypatch):
    """read() opened a named pipe (without waiting) and only then found it is not a file; opening a
    device acts (a watchdog arms). The type is checked first: the pipe is never opened."""
    os.mkfifo(tmp_path / "p.jpg")
    (tmp_path / "f.jpg").write_bytes(b"photo")
    opened: list[str] = []
    real_open = os.open

    def spy(path, flags, *a, **kw):  # calls through: only records what was opened
        opened.append(os.fspath(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    store = LocalStore(tmp_path)
    with pytest.raises(OSError, match="not a regular file"):
        store.read("p.jpg")
    assert store.read("f.jpg") == b"photo"
    assert not any(p.endswith("p.jpg") for p in opened), opened


def test_local_iter_keys_names_the_folders_it_cannot_list(tmp_path):
    """os.walk passed over a folder it cannot list without a word (the CLI walked SRC a second time
    to find them): iter_keys now names them in unreadable_folders, as keys ending in '/'."""
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "a.jpg").write_bytes(b"a")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.jpg").write_bytes(b"b")
    os.chmod(tmp_path / "locked", 0)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from platemask.storage import LocalStore
        s = LocalStore({str(tmp_path)!r})
        print(list(s.iter_keys()))
        print([(k, type(e).__name__, e.strerror) for k, e in s.unreadable_folders])
    """)
    cmd = [sys.executable, "-c", code]
    cmd = without_root_file_override(cmd)  # root lists any folder
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert out.returncode == 0, out.stderr
    keys, unreadable = out.stdout.splitlines()
    assert keys == "['open/a.jpg']"
    assert unreadable == "[('locked/', 'PermissionError', 'Permission denied')]"


def _profile_with(payload: bytes) -> bytes:
    """An sRGB ICC profile with ``payload`` after its tags (its size field counting it)."""
    import struct

    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() + payload
    return struct.pack(">I", len(icc)) + icc[4:]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("carrier", ["jpeg", "png_base64"])
def test_an_unmasked_copy_planted_in_the_icc_profile_is_not_published(fmt, carrier):
    """The ICC profile was copied as it was under every policy but strip (the default 'safe' too):
    a copy of the unmasked photo carried in it (after its tags, or as a private tag) was published
    beside the masked pixels. A profile holding an image that opens is left out; one whose tone
    curve holds the bytes FF D8 FF by chance is kept."""
    import base64
    import struct

    from platemask.imageio import decode, encode

    rng = np.random.default_rng(5)
    photo = rng.integers(0, 255, (40, 60, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", comment=b"UNMASKED-ORIGINAL")
    copy = buf.getvalue() if carrier == "jpeg" else base64.b64encode(
        _png(photo, b"UNMASKED-ORIGINAL"))
    src = io.BytesIO()
    Image.fromarray(photo).save(src, fmt, icc_profile=_profile_with(copy))
    assert copy in Image.open(io.BytesIO(src.getvalue())).info["icc_profile"]  # what the original carries
    dec = decode(src.getvalue())
    assert dec.icc_profile is None  # the detector looks at the pixels as they will be published
    for policy in ("safe", "keep"):
        out = encode(dec, dec.pixels, metadata=policy)
        back = Image.open(io.BytesIO(out))
        assert back.info.get("icc_profile") is None, policy
        assert b"UNMASKED-ORIGINAL" not in out and copy[:64] not in out
    # a profile whose 16-bit curve passes 0xFFD8, 0xFFE0 near white is kept (no image opens there)
    curve = struct.pack(">4sII", b"curv", 0, 4) + struct.pack(">4H", 0, 0x8000, 0xFFD8, 0xFFE0)
    plain = _profile_with(curve)
    assert b"\xff\xd8\xff" in plain
    src = io.BytesIO()
    Image.fromarray(photo).save(src, fmt, icc_profile=plain)
    dec = decode(src.getvalue())
    assert Image.open(io.BytesIO(encode(dec, dec.pixels))).info.get("icc_profile") == plain


def _png(rgb: np.ndarray, text: bytes) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("c", text.decode())
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_a_stale_link_at_an_output_key_is_removed_for_a_failed_photo(tmp_path):
    """A failed photo's stale output is removed when exists() says one is there: a link at its key
    leading nowhere or out of DST was 'not there' (or escaped, and was left with its error), so it
    stayed in DST, serving whatever it leads to under the failed photo's name."""
    from platemask.pipeline import remove_stale_output

    dst = tmp_path / "dst"
    dst.mkdir()
    (tmp_path / "elsewhere.jpg").write_bytes(b"an unmasked photo")
    os.symlink("gone.jpg", dst / "a.jpg")
    os.symlink("../elsewhere.jpg", dst / "b.jpg")
    store = LocalStore(dst)
    for key in ("a.jpg", "b.jpg"):
        assert store.exists(key)
        assert remove_stale_output(store, key) == {"stale_output_removed": str(dst / key)}
        assert not os.path.lexists(dst / key)
    assert (tmp_path / "elsewhere.jpg").read_bytes() == b"an unmasked photo"
    assert not store.exists("a.jpg")


def test_a_folder_link_in_dst_is_refused_not_written_through(tmp_path):
    """DST's x -> y (a 'latest' link, or a dedupe of two folders): x/a.jpg's masked copy was written
    over y/a.jpg's, one photo's output lost and its record naming the other's bytes, and removing
    x/a.jpg's stale copy deleted y/a.jpg. Writes and deletes through a folder link are refused,
    naming it; y/a.jpg is untouched."""
    dst = tmp_path / "dst"
    (dst / "y").mkdir(parents=True)
    (dst / "y" / "a.jpg").write_bytes(b"y's masked copy")
    os.symlink("y", dst / "x")
    store = LocalStore(dst)
    for act in (lambda: store.write("x/a.jpg", b"x's masked copy"), lambda: store.delete("x/a.jpg")):
        with pytest.raises(ValueError, match="is a link"):
            act()
    assert (dst / "y" / "a.jpg").read_bytes() == b"y's masked copy"
    store.write("y/b/c.jpg", b"new folder")  # folders that do not exist yet are made, as before
    assert (dst / "y" / "b" / "c.jpg").read_bytes() == b"new folder"


def _copy_as(fmt: str, rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP", "GIF", "BMP"])
@pytest.mark.parametrize("carrier", ["raw", "base64"])
@pytest.mark.parametrize("container", ["JPEG", "PNG"])
def test_an_unmasked_copy_in_another_format_planted_in_the_icc_profile_is_not_published(fmt, carrier, container):
    """Only a JPEG or PNG copy in the ICC profile was looked for: a TIFF, WebP, GIF or BMP copy of the
    unmasked photo (raw, or in base64) carried in it was published under the default policy, and
    opened there as the photo, pixel for pixel. Such a profile is now left out too."""
    import base64

    from platemask.imageio import decode, encode

    photo = np.random.default_rng(7).integers(0, 255, (40, 60, 3), np.uint8)
    copy = _copy_as(fmt, photo)
    payload = copy if carrier == "raw" else base64.b64encode(copy)
    assert Image.open(io.BytesIO(copy)).size == (60, 40)  # the planted copy is an image of the photo
    src = io.BytesIO()
    Image.fromarray(photo).save(src, container, icc_profile=_profile_with(payload))
    assert payload in Image.open(io.BytesIO(src.getvalue())).info["icc_profile"]
    dec = decode(src.getvalue())
    assert dec.icc_profile is None
    for policy in ("safe", "keep"):
        out = encode(dec, dec.pixels, metadata=policy)
        assert Image.open(io.BytesIO(out)).info.get("icc_profile") is None, policy
        assert payload[8:64] not in out


def test_a_profile_of_many_base64_runs_of_image_starts_is_judged_within_the_try_budget(monkeypatch):
    """Each run of base64 characters in an ICC profile was decoded and looked through with a budget of
    256 tries of its own: a 4.9 KB PNG whose 1 MB profile (zlib-compressed) was 11,000 short runs,
    each decoding to 16 TIFF starts, had 180,000 images tried, holding decode 13 s (a JPEG's 16 MB
    profile, minutes). The runs share the profile's one budget; a profile of more tries than that is
    left out, as one of raw starts is."""
    import base64

    from platemask import imageio

    run = base64.b64encode(b"II*\x00" * 16) + b" "
    icc = _profile_with(run * 2000)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(buf, "PNG", icc_profile=icc)
    assert Image.open(io.BytesIO(buf.getvalue())).info["icc_profile"] == icc
    opened = []
    real_open = imageio.Image.open
    monkeypatch.setattr(imageio.Image, "open", lambda fp, *a, **k: opened.append(1) or real_open(fp, *a, **k))
    dec = imageio.decode(buf.getvalue())
    assert len(opened) <= 256 + 1  # the photo itself, and the profile's tries
    assert dec.icc_profile is None
    assert imageio._holds_image(_profile_with(run * 2)) is False  # a few such runs: tried, none opens


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP", "GIF", "BMP"])
def test_an_unmasked_copy_in_another_format_in_an_exif_value_does_not_survive_keep(fmt):
    """Under --metadata keep, EXIF values holding a JPEG or PNG were dropped, not ones holding a TIFF,
    WebP, GIF or BMP copy of the unmasked photo (in a user comment, a maker note, XMP in base64, or a
    text tag, which Pillow reads as latin-1 and writes back with '?' for every byte above 127, the
    dark characters of a plate kept): all were published. They are dropped; the rest is kept."""
    import base64

    from PIL import ExifTags

    from platemask.imageio import decode, encode

    photo = np.random.default_rng(8).integers(0, 255, (40, 60, 3), np.uint8)
    copy = _copy_as(fmt, photo)
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Acme"
    exif[ExifTags.Base.ImageDescription] = copy
    exif[0x02BC] = b"<x:xmpmeta><xmpGImg:image>" + base64.b64encode(copy) + b"</xmpGImg:image></x:xmpmeta>"
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[ExifTags.Base.UserComment] = b"ASCII\0\0\0" + copy
    sub[ExifTags.Base.MakerNote] = b"Acme\0\1" + copy
    sub[ExifTags.Base.ExposureTime] = 0.01
    src = io.BytesIO()
    Image.fromarray(photo).save(src, "JPEG", exif=exif.tobytes())
    dec = decode(src.getvalue())
    out = encode(dec, dec.pixels, metadata="keep")
    back = Image.open(io.BytesIO(out)).getexif()
    assert back.get(ExifTags.Base.Make) == "Acme"
    assert back.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.ExposureTime) == 0.01
    for gone in (ExifTags.Base.ImageDescription, 0x02BC):
        assert gone not in back, gone
    assert not ({ExifTags.Base.UserComment, ExifTags.Base.MakerNote} & set(back.get_ifd(ExifTags.IFD.Exif)))
    assert copy[8:64] not in out and base64.b64encode(copy)[8:64] not in out


def _tiff_of_pages(n: int) -> bytes:
    """A little-endian TIFF of ``n`` one-pixel grey pages (one IFD each, all sharing one pixel byte)."""
    import struct

    entries = [(256, 1), (257, 1), (258, 8), (259, 1), (262, 1), (273, None), (277, 1), (278, 1), (279, 1)]
    size = 2 + 12 * len(entries) + 4
    pixel_at = 8 + n * size
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(n):
        out += struct.pack("<H", len(entries))
        for tag, value in entries:
            if value is None:
                out += struct.pack("<HHII", tag, 4, 1, pixel_at)
            else:
                out += struct.pack("<HHIHH", tag, 3, 1, value, 0)
        out += struct.pack("<I", 8 + (i + 1) * size if i + 1 < n else 0)
    return bytes(out + b"\x80")


def test_a_tiff_of_many_pages_is_refused_without_walking_them_all(monkeypatch):
    """Pillow's n_frames walks every page of a TIFF, checking each against all those before it: a
    5.7 MB upload of 50,000 one-pixel pages held the decoder (and the interpreter lock, so the
    detector and every other thread of the worker) for 16 s, a 34 MB one of 300,000 for minutes.
    Pages are now counted up to FRAME_COUNT_CAP; the file still fails multi_page_unsupported."""
    from PIL import TiffImagePlugin

    from platemask.imageio import FRAME_COUNT_CAP, ImageError, decode

    pages = 3 * FRAME_COUNT_CAP
    data = _tiff_of_pages(pages)
    seen: list[int] = []
    real_seek = TiffImagePlugin.TiffImageFile._seek

    def spy(self, frame):  # calls through: only records how far the file was walked
        seen.append(frame)
        return real_seek(self, frame)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_seek", spy)
    with pytest.raises(ImageError) as e:
        decode(data)
    assert e.value.reason == "multi_page_unsupported" and f"more than {FRAME_COUNT_CAP} pages" in str(e.value)
    assert max(seen) <= FRAME_COUNT_CAP + 1 < pages
    with pytest.raises(ImageError) as e:
        decode(_tiff_of_pages(3))
    assert e.value.reason == "multi_page_unsupported" and "3 pages" in str(e.value)
    assert decode(_tiff_of_pages(1)).pixels.shape == (1, 1)


def test_a_progressive_jpeg_with_its_scans_repeated_fails_before_decoding():
    """libjpeg decodes a progressive JPEG's repeated scans (with a warning), each over the whole photo:
    a 123 KB upload of a 12 MP photo whose last 26-byte scan was repeated 2,000 times held a worker
    16 s (a 10 MB one would hold it for hours). A JPEG of more than MAX_JPEG_SCANS scans fails
    'corrupt' with what to do before any pixel is decoded; ordinary progressive JPEGs decode."""
    from platemask.imageio import MAX_JPEG_SCANS, ImageError, decode

    rgb = np.random.default_rng(9).integers(0, 255, (48, 64, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    bomb = data[:-2] + data[last:-2] * MAX_JPEG_SCANS + b"\xff\xd9"
    assert Image.open(io.BytesIO(bomb)).size == (64, 48)  # what Pillow opens and would decode, scan by scan
    with pytest.raises(ImageError) as e:
        decode(bomb)
    assert e.value.reason == "corrupt" and f"more than {MAX_JPEG_SCANS} scans" in str(e.value) and "re-save" in str(e.value)
    assert decode(data).rgb.shape == (48, 64, 3)
    assert decode(data[:-2] + data[last:-2] * 3 + b"\xff\xd9").rgb.shape == (48, 64, 3)  # a few repeats: decoded


@pytest.mark.parametrize("junk", [b"\x00", b"\xff\x00\x00"])
def test_repeated_scans_behind_extraneous_bytes_still_fail_before_decoding(junk):
    """The scan count stopped at the first byte between segments that is not a marker, which libjpeg
    skips with a warning and reads on: one 00 byte before the first scan of the 123 KB, 12 MP photo
    whose last scan was repeated 2,000 times counted 0 scans, and decode held a worker 24 s. Scans
    are counted past such bytes, as libjpeg reads them; an ordinary progressive JPEG with such a
    byte still decodes."""
    from platemask.imageio import MAX_JPEG_SCANS, ImageError, decode

    rgb = np.random.default_rng(9).integers(0, 255, (48, 64, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    first = data.index(b"\xff\xda")
    data = data[:first] + junk + data[first:]
    last = data.rindex(b"\xff\xda")
    bomb = data[:-2] + data[last:-2] * MAX_JPEG_SCANS + b"\xff\xd9"
    assert Image.open(io.BytesIO(bomb)).size == (64, 48)
    with pytest.raises(ImageError) as e:
        decode(bomb)
    assert e.value.reason == "corrupt" and f"more than {MAX_JPEG_SCANS} scans" in str(e.value)
    assert decode(data).rgb.shape == (48, 64, 3)


@pytest.mark.parametrize("compression", ["tiff_deflate", "tiff_lzw"])
def test_a_compressed_tiff_cut_short_is_named_as_damaged_not_as_not_a_photo(compression):
    """libtiff writes a compressed TIFF's directory after its pixels: an upload cut short anywhere
    failed 'not_an_image' ("check that it is a photo, or move it out of the source"), which tells
    the operator to drop a photo that only needs uploading again. It now fails 'corrupt', naming
    what it starts as and what to do; text is still not an image."""
    from platemask.imageio import ImageError, decode

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 96, 3), np.uint8)).save(buf, "TIFF", compression=compression)
    data = buf.getvalue()
    for cut in (len(data) // 3, len(data) - 20):
        with pytest.raises(ImageError) as e:
            decode(data[:cut])
        assert e.value.reason == "corrupt" and "starts as a TIFF file" in str(e.value) and "upload" in str(e.value)
    with pytest.raises(ImageError) as e:
        decode(b"II* is how this note begins, and it is not a photo\n" * 4)
    assert e.value.reason in ("corrupt", "not_an_image")
    with pytest.raises(ImageError) as e:
        decode(b"just a text file\n" * 8)
    assert e.value.reason == "not_an_image"
