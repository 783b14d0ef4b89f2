"""The detector looks at the photo as a colour-managed viewer shows it (platemask.colour)."""
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from platemask.cli import main
from platemask.colour import shown
from platemask.imageio import decode, decoded_nbytes

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def stretching_profile(levels: int) -> bytes:
    """An RGB profile whose tone curve shows stored values 0..levels as the full range (and above
    as white): lcms' sRGB profile with each TRC replaced by the ICC parametric curve
    Y = (a X) ** 2.2, a = 255 / levels."""
    icc = bytearray(_SRGB.tobytes())
    (count,) = struct.unpack(">I", icc[128:132])
    for i in range(count):
        sig, off, size = struct.unpack(">4sII", icc[132 + 12 * i:144 + 12 * i])
        if sig in (b"rTRC", b"gTRC", b"bTRC"):
            para = b"para" + bytes(4) + struct.pack(">H", 1) + bytes(2) + _s15(2.2) + _s15(255 / levels) + _s15(0.0)
            icc[off:off + size] = para.ljust(size, b"\0")
    return bytes(icc)


def _through_profile(stored: np.ndarray, icc: bytes) -> np.ndarray:
    """What a viewer shows: lcms applying the embedded profile (as browsers do)."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return np.asarray(ImageCms.profileToProfile(Image.fromarray(stored), src, _SRGB, outputMode="RGB"))


def test_the_view_is_the_stored_pixels_when_a_viewer_shows_them_as_stored():
    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    assert shown(rgb) is rgb
    assert shown(rgb, _SRGB.tobytes()) is rgb  # the sRGB profiles cameras embed
    assert shown(rgb, b"not a profile at all") is rgb  # unreadable: viewers fall back to the stored values
    assert shown(rgb, ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()) is rgb
    assert shown(rgb, None, 0.45455) is rgb  # a PNG's sRGB-like gAMA
    assert shown(rgb, None, float("nan")) is rgb and shown(rgb, None, 0.0) is rgb


def test_the_view_follows_a_tone_curve_profile_and_a_png_gamma():
    rgb = (np.random.default_rng(1).random((50, 70, 3)) * 4).astype(np.uint8)  # stored 0..3
    icc = stretching_profile(3)
    view = shown(rgb, icc)
    assert view is not rgb and np.array_equal(view, _through_profile(rgb, icc))
    assert view.max() >= 250 and rgb.max() <= 3  # what the screen shows spans the range
    ramp = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, 2)
    gamma = shown(ramp, None, 1.0)  # stored = linear ** 1.0: a viewer shows linear ** (1 / 2.2)
    want = np.round(255 * (np.arange(256) / 255) ** (1 / 2.2))
    assert np.abs(gamma[0, :, 0].astype(int) - want).max() <= 1
    black, alpha = np.zeros((1, 3, 3), np.uint8), np.array([[0, 128, 255]], np.uint8)
    assert shown(black, alpha=alpha)[0, :, 0].tolist() == [255, 127, 0]  # over a white page
    assert shown(black + 255, alpha=alpha, backdrop=0)[0, :, 0].tolist() == [0, 128, 255]  # over a dark one
    assert shown(black, alpha=np.full((1, 3), 255, np.uint8)) is black  # opaque: as stored


def _hidden_plate_png(scene, levels: int) -> tuple[bytes, np.ndarray]:
    """The generated photo stored as levels+1 dark values, with a profile that shows it as it was."""
    img, quads, _ = scene
    stored = np.round(img.astype(np.float32) / 255 * levels).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", icc_profile=stretching_profile(levels))
    return buf.getvalue(), stored


def test_decode_gives_the_detector_the_photo_as_shown_and_keeps_the_stored_pixels(scene):
    data, stored = _hidden_plate_png(scene, 2)
    dec = decode(data)
    assert np.array_equal(dec.pixels, stored)  # what is masked and written: the stored values
    assert np.array_equal(dec.rgb, _through_profile(stored, dec.icc_profile))
    assert decoded_nbytes(data) == stored.size * 2  # the view is a second copy: reserved with the pixels


def _masked_as_one_photo(tmp_path, model_dir, save) -> Path:
    """``save(path)`` writes car.png into a fresh SRC; the CLI masks it with the shipped model, and
    the one record must say masked, with plates. Returns the published car.png."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    save(src / "car.png")
    det = tmp_path / "d.jsonl"
    assert main(["mask", str(src), str(dst), "--model", str(model_dir), "--detections", str(det)]) == 0
    (rec,) = [json.loads(line) for line in det.read_text().splitlines()]
    assert rec["status"] == "masked" and rec["plates"], rec
    return dst / "car.png"


def test_a_plate_stored_dark_under_a_stretching_profile_is_found_and_masked(scene, tmp_path, model_dir):
    """A PNG whose stored values are three dark levels (0..2) and whose ICC profile shows them as
    the full range: every browser shows a readable plate. The detector saw the stored, nearly
    black pixels and found nothing: "no plate", published with its profile kept and the plate
    readable. It now looks at the photo as shown, and the plate is masked in the stored pixels."""
    _, _, texts = scene
    data, stored = _hidden_plate_png(scene, 2)
    out = Image.open(_masked_as_one_photo(tmp_path, model_dir, lambda path: path.write_bytes(data)))
    icc = out.info.get("icc_profile")
    assert icc  # the published photo still shows as the original did
    from rapidocr_onnxruntime import RapidOCR

    ocr = RapidOCR()
    text = texts[0].replace(" ", "")

    def read(pixels):  # every text OCR reads in the photo as a viewer shows it
        return "".join(t for _, t, _ in (ocr(_through_profile(pixels, icc))[0] or [])).replace(" ", "")

    assert text in read(stored)  # the original shows a readable plate
    assert not any(text[i:i + 3] in read(np.asarray(out.convert("RGB"))) for i in range(len(text) - 2))


def test_a_plate_drawn_in_the_alpha_channel_alone_is_found_and_masked(scene, tmp_path, model_dir):
    """A PNG whose colours are all black and whose alpha holds the photo (transparent where it is
    light): on a white page every browser shows the plate. The detector saw the colours alone, all
    black, and found nothing: "no plate", published with the plate readable. It now looks at the
    photo composited as shown, and the plate is masked in colours and alpha alike."""
    from rapidocr_onnxruntime import RapidOCR

    img, _, texts = scene
    grey = np.asarray(Image.fromarray(img).convert("L"))
    rgba = np.dstack([np.zeros_like(img), 255 - grey])
    published = _masked_as_one_photo(tmp_path, model_dir, lambda path: Image.fromarray(rgba, "RGBA").save(path))
    ocr = RapidOCR()
    text = texts[0].replace(" ", "")

    def on_white(rgba_pixels):  # a browser's page
        a = rgba_pixels[..., 3:].astype(np.float32) / 255
        page = rgba_pixels[..., :3] * a + 255 * (1 - a)
        return "".join(t for _, t, _ in (ocr(page.astype(np.uint8))[0] or [])).replace(" ", "")

    assert text in on_white(rgba)
    after = np.asarray(Image.open(published).convert("RGBA"))
    assert not any(text[i:i + 3] in on_white(after) for i in range(len(text) - 2))


def test_a_plate_hidden_from_viewers_by_transparency_is_masked_in_the_stored_colours(scene, tmp_path, model_dir):
    """A PNG whose alpha is 0 over the plate: a browser shows the page there, the detector (looking
    at the photo as shown) saw no plate, and it was published as 'no plate' with the plate intact
    in its colours, readable to every tool that drops the alpha (converters, thumbnailers, an ML
    pipeline reading RGB). The detector now also looks at the stored colours where they differ from
    the view, and the plate is masked in them."""
    from rapidocr_onnxruntime import RapidOCR

    img, quads, texts = scene
    alpha = np.full(img.shape[:2], 255, np.uint8)
    x0, y0 = np.floor(quads[0].min(axis=0)).astype(int) - 6
    x1, y1 = np.ceil(quads[0].max(axis=0)).astype(int) + 6
    alpha[max(y0, 0):y1, max(x0, 0):x1] = 0
    published = _masked_as_one_photo(tmp_path, model_dir,
                                     lambda path: Image.fromarray(np.dstack([img, alpha]), "RGBA").save(path))
    ocr = RapidOCR()
    text = texts[0].replace(" ", "")

    def read(rgb):
        return "".join(t for _, t, _ in (ocr(np.ascontiguousarray(rgb))[0] or [])).replace(" ", "")

    assert text in read(img)  # the colours alone show a readable plate
    after = np.asarray(Image.open(published).convert("RGBA"))[..., :3]  # the alpha dropped
    assert not any(text[i:i + 3] in read(after) for i in range(len(text) - 2))
    original = tmp_path / "src" / "car.png"
    dec = decode(original.read_bytes())
    assert len(dec.detector_views) == 3 and np.array_equal(dec.detector_views[1], img)
    from platemask.imageio import _bytes_per_pixel

    # reserved for: the pixels (and Pillow's copy), the views over a white and a dark page, and the stored colours' view
    assert decoded_nbytes(original.read_bytes()) == img.shape[0] * img.shape[1] * (_bytes_per_pixel("RGBA") + 3 + 3 + 3)


def _display_p3() -> bytes:
    """lcms' sRGB profile with Display P3's primaries (D50-adapted): what every iPhone photo embeds."""
    icc = bytearray(_SRGB.tobytes())
    (count,) = struct.unpack(">I", icc[128:132])
    prims = {b"rXYZ": (0.5151, 0.2412, -0.0011), b"gXYZ": (0.2919, 0.6922, 0.0419), b"bXYZ": (0.1571, 0.0666, 0.7841)}
    for i in range(count):
        sig, off, _ = struct.unpack(">4sII", icc[132 + 12 * i:144 + 12 * i])
        if sig in prims:
            icc[off:off + 20] = b"XYZ " + bytes(4) + b"".join(_s15(v) for v in prims[sig])
    return bytes(icc)


def test_the_stored_values_are_looked_at_too_only_where_the_view_may_hide_them():
    """Two views cost two detector passes: a profile that only moves the gamut (Display P3) keeps one,
    a tone curve that changes what is visible, a gamma far from sRGB's and transparency get both."""
    from platemask.colour import may_hide

    rgb = (np.random.default_rng(2).random((40, 60, 3)) * 255).astype(np.uint8)
    p3 = _display_p3()
    assert shown(rgb, p3) is not rgb and not may_hide(p3)  # converted, but its tones are the stored ones
    assert may_hide(stretching_profile(3)) and not may_hide(_SRGB.tobytes())
    assert may_hide(png_gamma=1.0) and not may_hide(png_gamma=0.45455)
    assert may_hide(alpha=np.full((2, 2), 254, np.uint8)) and not may_hide(alpha=np.full((2, 2), 255, np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", icc_profile=p3)
    assert len(decode(buf.getvalue()).detector_views) == 1
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", icc_profile=stretching_profile(3))
    assert len(decode(buf.getvalue()).detector_views) == 2


@pytest.mark.parametrize("colour, page", [(128, 255), (255, 0)])
def test_a_plate_drawn_in_the_alpha_over_the_backdrops_colour_is_found_and_masked(scene, tmp_path, model_dir, colour, page):
    """Transparency was shown to the detector over mid-grey alone. A PNG whose colours are all mid-grey
    (128) and whose alpha holds the photo was flat grey in that view and in its colours: "no plate"
    (a real held-out photo so made: no_plate, published as it was, while Chromium showed its plate
    on a white page and the model found it there at 1.0). The detector now looks at such a photo
    over a white page and over a dark one (white colours show a plate drawn in the alpha only on a
    dark page: a dark-mode page, a browser's own image view), and the plate is masked."""
    from rapidocr_onnxruntime import RapidOCR

    img, _, texts = scene
    grey = np.asarray(Image.fromarray(img).convert("L"))
    alpha = 255 - grey if page == 255 else grey  # the plate shows the right way round on that page
    rgba = np.dstack([np.full_like(img, colour), alpha])
    published = _masked_as_one_photo(tmp_path, model_dir, lambda path: Image.fromarray(rgba, "RGBA").save(path))
    ocr = RapidOCR()
    text = texts[0].replace(" ", "")

    def on_page(rgba_pixels):
        a = rgba_pixels[..., 3:].astype(np.float32) / 255
        shown_there = rgba_pixels[..., :3] * a + page * (1 - a)
        return "".join(t for _, t, _ in (ocr(shown_there.astype(np.uint8))[0] or [])).replace(" ", "")

    assert text in on_page(rgba)
    after = np.asarray(Image.open(published).convert("RGBA"))
    assert not any(text[i:i + 3] in on_page(after) for i in range(len(text) - 2))


@pytest.mark.parametrize("second", ["before the pixels", "after the pixels"])
def test_the_first_icc_profile_before_the_pixels_is_the_one_viewers_apply(second):
    """A PNG with a profile that shows its 16 dark stored levels at full range, and a second, sRGB
    iCCP chunk: browsers apply the first before the pixels (Chromium 156 shows the plate), Pillow
    kept the last (reading one after the pixels as they load), so the detector looked only at the
    dark stored values: a real held-out photo so made was recorded no_plate (0.98 under the first
    profile alone) and published with its plate in those levels. The detector now sees the photo
    as browsers show it, and the masked copy keeps the profile they apply."""
    import zlib

    from platemask.imageio import encode

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def iccp(profile: bytes) -> bytes:
        return chunk(b"iCCP", b"p\0\0" + zlib.compress(profile))

    stored = np.zeros((40, 60, 3), np.uint8)
    stored[10:30:2, 10:50] = 15  # a plate's stripes in the top stored level
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG")
    png = buf.getvalue()
    at, end = png.index(b"IDAT") - 4, png.rindex(b"IEND") - 4
    first, srgb = stretching_profile(15), _SRGB.tobytes()
    if second == "before the pixels":
        data = png[:at] + iccp(first) + iccp(srgb) + png[at:]
    else:
        data = png[:at] + iccp(first) + png[at:end] + iccp(srgb) + png[end:]
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.info["icc_profile"] == srgb  # Pillow's reading
    dec = decode(data)
    assert dec.icc_profile == first
    stripes = [np.abs(np.diff(v[10:30, 10:50, 0].astype(int), axis=0)).mean() for v in dec.detector_views]
    assert max(stripes) > 200, stripes  # seen at full range, as browsers show it
    assert Image.open(io.BytesIO(encode(dec, dec.pixels))).info.get("icc_profile") == first


@pytest.mark.parametrize("segments", ["two whole profiles", "a profile in two parts, then another"])
def test_a_jpegs_first_complete_icc_profile_is_the_one_viewers_apply(segments):
    """A JPEG with a profile that shows its dark stored levels at full range, then a second, sRGB
    profile in APP2 segments of its own: browsers apply the first complete one (Chromium 156 shows
    the plate), Pillow reads no profile at all (its segments are more than one profile's), so the
    detector saw the dark stored values alone: a real held-out photo so made (16 levels) was
    recorded no_plate, masked under the first profile alone. The detector now sees the photo as
    browsers show it, and the masked copy keeps that profile."""
    from platemask.imageio import encode

    def app2(seq: int, count: int, body: bytes) -> bytes:
        s = b"ICC_PROFILE\0" + bytes([seq, count]) + body
        return b"\xff\xe2" + struct.pack(">H", len(s) + 2) + s

    stored = np.zeros((48, 64, 3), np.uint8)
    stored[8:40:4, 8:56] = 15  # a plate's stripes in the top stored level
    stored[9:40:4, 8:56] = 15
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=100, subsampling=0)
    jpeg = buf.getvalue()
    first, srgb = stretching_profile(15), _SRGB.tobytes()
    half = len(first) // 2
    parts = [app2(1, 1, first)] if segments == "two whole profiles" else [app2(2, 2, first[half:]), app2(1, 2, first[:half])]
    data = jpeg[:2] + b"".join(parts) + app2(1, 1, srgb) + jpeg[2:]
    assert Image.open(io.BytesIO(data)).info.get("icc_profile") is None  # Pillow's reading
    dec = decode(data)
    assert dec.icc_profile == first
    stripes = [np.abs(np.diff(v[8:40, 8:56, 0].astype(int), axis=0)).mean() for v in dec.detector_views]
    assert max(stripes) > 100, stripes  # seen at full range, as browsers show it
    assert Image.open(io.BytesIO(encode(dec, dec.pixels))).info.get("icc_profile") == first


@pytest.mark.parametrize("junk", [b"\x00", b"\x00\x00\x00\x00", b"\xff\x00"])
def test_a_jpegs_profile_after_extraneous_bytes_is_applied_and_kept(junk):
    """Bytes that are not a marker between a JPEG's segments (writers that pad a segment leave them;
    libjpeg warns "extraneous bytes before marker" and reads on, and so do Pillow and browsers) ended
    the reading of its first complete profile: a Display P3 photo with a padded EXIF lost its
    profile (published in other colours), and one stored dark under a profile that shows it at full
    range was seen by the detector in its dark stored values, as it was before that reading (Pillow
    applies the profile there). The segments after such bytes are read as libjpeg reads them."""
    from platemask.imageio import encode

    stored = np.zeros((48, 64, 3), np.uint8)
    stored[8:40:4, 8:56] = 15  # a plate's stripes in the top stored level
    stored[9:40:4, 8:56] = 15
    for profile in (stretching_profile(15), _display_p3()):
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, "JPEG", quality=100, subsampling=0, icc_profile=profile,
                                     exif=Image.Exif().tobytes())
        jpeg = buf.getvalue()
        at = jpeg.index(b"\xff\xe2")  # the profile's APP2, after the EXIF's APP1
        data = jpeg[:at] + junk + jpeg[at:]
        assert Image.open(io.BytesIO(data)).info.get("icc_profile") == profile  # Pillow reads on
        dec = decode(data)
        assert dec.icc_profile == profile
        assert Image.open(io.BytesIO(encode(dec, dec.pixels))).info.get("icc_profile") == profile
        if profile != _display_p3():  # the dark plate: seen at full range, as browsers show it
            stripes = [np.abs(np.diff(v[8:40, 8:56, 0].astype(int), axis=0)).mean() for v in dec.detector_views]
            assert max(stripes) > 100, stripes


@pytest.mark.parametrize("layout", ["two whole profiles", "bytes that are not a marker before it"])
def test_the_memory_reserved_counts_the_view_of_a_jpegs_first_complete_profile(layout):
    """The memory reserved before decoding (decoded_nbytes) counted a JPEG's profile view only where
    Pillow reads a profile, while decode applies the first complete one, which Pillow does not read
    where the segments are more than one profile's: such a photo held its view as shown (3 bytes a
    pixel, 240 MB at 80 MP) beyond what was reserved for it. It is counted."""
    def app2(seq: int, count: int, body: bytes) -> bytes:
        s = b"ICC_PROFILE\0" + bytes([seq, count]) + body
        return b"\xff\xe2" + struct.pack(">H", len(s) + 2) + s

    stored = np.zeros((48, 64, 3), np.uint8)
    stored[8:40:2, 8:56] = 15
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=100, subsampling=0, exif=Image.Exif().tobytes())
    jpeg = buf.getvalue()
    at = 4 + struct.unpack(">H", jpeg[4:6])[0]  # after the EXIF's APP1
    first = stretching_profile(15)
    if layout == "two whole profiles":
        data = jpeg[:at] + app2(1, 1, first) + app2(1, 1, _SRGB.tobytes()) + jpeg[at:]
    else:
        data = jpeg[:at] + b"\0" + app2(1, 1, first) + jpeg[at:]
    dec = decode(data)
    assert dec.icc_profile == first
    held = dec.pixels.nbytes + sum(v.nbytes for v in dec.detector_views if not np.shares_memory(v, dec.pixels))
    assert decoded_nbytes(data) >= held
