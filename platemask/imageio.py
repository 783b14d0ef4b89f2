"""Image decoding and encoding at the edges of the pipeline.

Decoding reads phones' MPO as the JPEG of its first frame (the other frames dropped and counted),
refuses other multi-page or animated files rather than cut them silently, applies EXIF orientation
first (detection and output share one pixel frame; XMP's tiff:Orientation, a PNG's EXIF in a text
chunk or after its pixels, an EXIF with a second "Exif\\0\\0" header are not applied, as browsers
ignore them; a WebP with one fails, as browsers show it as stored and other tools turn it), refuses
decompression bombs before any pixel is decoded, and normalises the many modes photos come in: 16-bit grey is kept and
seen by its levels (a 16-bit file holding 8-bit values is not black to the detector), 16-bit colour
is reduced by its levels, float and 32-bit grey become 16-bit grey, WhiteIsZero deep grey is inverted.
Encoding keeps the input's format (JPEG in → JPEG out, PNG in → PNG out) and applies an explicit
metadata policy: the EXIF thumbnail (an unmasked copy of the photo) never survives; ``safe`` (the
default) keeps only an allow-list (camera make and model, exposure settings, date-time, colour space
and the ICC profile, unless it carries an image; orientation reset to 1 as the pixels are upright); ``strip`` keeps no EXIF;
``keep`` keeps all EXIF but the thumbnail, any value holding another preview (a maker note's,
Photoshop's) and the tags that describe how the original's pixels were stored. XMP, IPTC, comments
and PNG text chunks are never written (but for EXIF's own XMP and IPTC tags under ``keep``).
"""
from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin, UnidentifiedImageError

from .colour import DARK_BACKDROP, may_hide, shown
from .constants import DEFAULT_METADATA_POLICY, MetadataPolicy
from .rows import BAND_BYTES, row_bands

SUPPORTED_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif"}
# Read as another format: MPO (phones' multi-picture JPEG) is masked and written as a plain JPEG of its first frame.
READ_AS = {"MPO": "JPEG"}
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
# The pixel limit (one home): inputs above ``max_pixels`` are refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 80_000_000  # ~ 10000 x 8000
MAX_PIXELS_CEILING = 250_000_000  # the most --max-pixels accepts (~ 20000 x 12500; ~3 GB of RAM per image in flight)
# Pillow's own bomb guard (89.5 MP by default) refused first whatever --max-pixels said: it now
# warns (which decode treats as too large) above our ceiling, so our limit is the one that decides.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS_CEILING


def max_file_bytes(max_pixels: int) -> int:
    """The most bytes a supported image of ``max_pixels`` pixels can take on disk: 8 a pixel (16-bit
    RGBA stored uncompressed) plus 64 MB of metadata. A larger file is refused unread, as too large:
    reading it whole (a video or disk image in the folder) could take more memory than the machine has."""
    return check_max_pixels(max_pixels) * 8 + (64 << 20)


def check_max_pixels(max_pixels: int) -> int:
    """``max_pixels`` if within 1..MAX_PIXELS_CEILING, else ValueError naming the range."""
    if not 1 <= max_pixels <= MAX_PIXELS_CEILING:
        raise ValueError(f"max_pixels must be within 1..{MAX_PIXELS_CEILING:,}, got {max_pixels:,}")
    return max_pixels

# The 'safe' policy is an allow-list: what a reviewer needs to judge a photo and nothing that can
# name a person, device or place. Everything else goes: GPS, XMP (also inside EXIF, tag 0x02BC),
# IPTC (0x83BB), maker notes, serial numbers, owner/artist/document names, comments, the thumbnail.
_B = ExifTags.Base
SAFE_IFD0 = frozenset({
    _B.Make, _B.Model, _B.DateTime, _B.XResolution, _B.YResolution, _B.ResolutionUnit,
})
SAFE_EXIF_IFD = frozenset({
    # exposure settings
    _B.ExposureTime, _B.FNumber, _B.ExposureProgram, _B.ISOSpeedRatings, _B.SensitivityType,
    _B.RecommendedExposureIndex, _B.ISOSpeed, _B.ShutterSpeedValue, _B.ApertureValue, _B.BrightnessValue,
    _B.ExposureBiasValue, _B.MaxApertureValue, _B.MeteringMode, _B.LightSource, _B.Flash, _B.FocalLength,
    _B.ExposureIndex, _B.ExposureMode, _B.WhiteBalance, _B.DigitalZoomRatio, _B.FocalLengthIn35mmFilm,
    _B.SceneCaptureType,
    # date-time
    _B.DateTimeOriginal, _B.DateTimeDigitized, _B.OffsetTime, _B.OffsetTimeOriginal, _B.OffsetTimeDigitized,
    _B.SubsecTime, _B.SubsecTimeOriginal, _B.SubsecTimeDigitized,
    # colour
    _B.ColorSpace, _B.Gamma, _B.ExifVersion,
})


# every reason ``decode`` fails a photo with: each is a fault of the upload's bytes, so the same
# upload fails the same way again (late pick-up leaves such a photo to a new upload: runs.UPLOAD_FAULTS)
DECODE_FAULTS = frozenset({
    "empty_file", "not_an_image", "unsupported_format", "unsupported_mode", "multi_page_unsupported", "corrupt",
    "truncated", "too_large", "ambiguous_orientation"})


class ImageError(Exception):
    """An input that cannot be processed. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Decoded:
    """A decoded photo in its display orientation.

    ``pixels`` keeps the depth and channels to write back (uint8 RGB/L/RGBA/LA or uint16 L);
    ``rgb`` is the uint8 RGB view the detector sees (for uint16, by its levels: ``_view16``): the
    photo as a colour-managed viewer shows it (its ICC profile or a PNG's gAMA applied, transparency
    over a white page; ``platemask.colour``), at the same pixels' positions; ``dark_rgb`` the same
    over a dark page where the photo has transparency, else None. ``stored_rgb`` is the stored
    values as uint8 RGB when that view may hide what they show (``colour.may_hide``), else None: a
    tool that ignores the profile, the gamma or the alpha (many do: thumbnailers, converters, ML pipelines) shows those, so the
    detector looks at both (``detector_views``) and what either shows is masked.
    """

    pixels: np.ndarray
    mode: str  # PIL mode of ``pixels`` when written: 'RGB', 'RGBA', 'L', 'LA' or 'I;16'
    format: str
    rgb: np.ndarray
    exif: Image.Exif | None = None
    icc_profile: bytes | None = None
    orientation: int = 1
    frames_dropped: int = 0  # MPO (multi-picture JPEG): frames after the first, not written
    # a JPEG's chroma subsampling as Pillow numbers it (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0); -1 = none or unknown
    subsampling: int = -1
    stored_rgb: np.ndarray | None = None
    dark_rgb: np.ndarray | None = None
    # 16-bit grey (written at 16 bits) whose content spans more than SHADOWS_SPAN levels: its shadows
    # lifted (``_shadows16``), a further view the detector looks at; else None
    shadows_rgb: np.ndarray | None = None

    @property
    def detector_views(self) -> list[np.ndarray]:
        """What the detector looks at, each at the pixels' positions: the photo as shown, and its stored
        values where those differ (a profile or an alpha channel that hides a plate from viewers that
        apply it leaves it readable to every tool that does not), the photo over a dark page where it
        has transparency (a plate drawn in the alpha over white colours shows there alone), and a 16-bit grey photo's shadows
        lifted (a plate 8 stops down is black in its view, readable in the 16-bit file once brightened)."""
        return [v for v in (self.rgb, self.stored_rgb, self.dark_rgb, self.shadows_rgb) if v is not None]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


_VIEW_SAMPLES = 1 << 20  # pixels of a 16-bit photo sampled for its levels


_LEVEL_SAMPLES = 8  # sampled pixels beyond a level that make it the darkest or brightest content


def _levels16(a: np.ndarray) -> tuple[int, int]:
    """The darkest and brightest levels of a 16-bit photo's content (from a sample of its pixels):
    where its content lies, whatever the container's range. A few stuck pixels do not set them,
    and a small bright plate in a dark photo does (a percentile left it out, saturated white)."""
    step = max(1, int(np.sqrt(a.shape[0] * a.shape[1] / _VIEW_SAMPLES)))
    cdf = np.cumsum(np.bincount(a[::step, ::step].ravel(), minlength=1 << 16))
    k = min(_LEVEL_SAMPLES, max(1, int(cdf[-1]) // 4))
    lo = int(np.searchsorted(cdf, k))
    hi = int(np.searchsorted(cdf, cdf[-1] - k))
    return lo, max(hi, lo + 1)


def _view16(a: np.ndarray, span: int = 1 << 15) -> np.ndarray:
    """The uint8 view of 16-bit pixels the detector sees: their high byte, or, for content within
    less than ``span`` levels, its levels stretched to 0..255.
    The high byte alone (``a >> 8``) was black for a 16-bit file holding 8- or 9-bit values (what
    ``arr.astype(np.uint16)`` writes; ImageJ and photo editors show it by its levels): its plate went
    undetected and was published as stored, readable in the low bits."""
    lo, hi = _levels16(a)
    if hi - lo >= span:  # a photo that spans enough of the range: seen as stored
        return (a >> 8).astype(np.uint8)
    out = np.empty(a.shape, np.uint8)
    for band in row_bands(a.shape[0], a.shape[1] * 4):  # the float copy is one band's size
        rows = (a[band].astype(np.float32) - lo) * (255.0 / (hi - lo))
        out[band] = np.clip(np.rint(rows), 0, 255)
    return out


# 16-bit grey content spanning more levels than this (its view merges 16 or more into one 8-bit level)
# is also seen with its shadows lifted (_shadows16)
SHADOWS_SPAN = 1 << 12


def _shadows16(a: np.ndarray) -> np.ndarray | None:
    """16-bit grey pixels ``a`` through a log curve from their darkest to their brightest level, or None
    when their content spans at most SHADOWS_SPAN levels. 16-bit grey is written at 16 bits, and its
    view (the high byte, or its levels stretched) showed a plate in deep shadow (values under 256 in
    a full-range photo: a real held-out photo's plate, 8 stops down) as black: the detector found
    nothing, while the published file showed the plate readable to any 16-bit tool brightened by 8
    stops. On the log curve each doubling of the stored value gets the same share of the 8-bit
    levels, so such a plate shows with its contrast (the real one: found at 0.99)."""
    lo, hi = _levels16(a)
    span = hi - lo
    if span <= SHADOWS_SPAN:
        return None
    out = np.empty(a.shape, np.uint8)
    scale = np.float32(255.0 / np.log1p(span))
    for band in row_bands(a.shape[0], a.shape[1] * 4):  # the float copy is one band's size
        rows = a[band].astype(np.float32)
        rows -= np.float32(lo)
        np.clip(rows, 0, span, out=rows)
        np.log1p(rows, out=rows)
        rows *= scale
        out[band] = np.rint(rows)
    return out


def _to_rgb8(pixels: np.ndarray) -> np.ndarray:
    a = pixels
    if a.dtype == np.uint16:
        a = _view16(a)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 2:  # LA
        return np.repeat(a[..., :1], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


# EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
DECODE_READ_MAX = 16 << 20  # the most encoded bytes handed to Pillow's decoder in one read


def _array(img: Image.Image) -> np.ndarray:
    """``np.array(img)`` in strips of rows: Pillow's array interface first copies the whole image
    into one ``bytes`` (a second full-size copy beside the result: 237 MB more for a 79 MP photo).
    A photo that fits one strip is copied whole: the strips' crops cost 5.7 ms more on a 1280 x 720
    photo (0.5 ms against 6.2), and the transient copy is one strip's size at most."""
    w, h = img.size
    if w * h * len(img.getbands()) <= BAND_BYTES:  # 8-bit modes only reach here (16-bit: _normalise)
        return np.array(img)
    first = np.asarray(img.crop((0, 0, w, min(1, h))))
    out = np.empty((h, *first.shape[1:]), first.dtype)
    for band in row_bands(h, first.nbytes, BAND_BYTES):
        out[band] = np.asarray(img.crop((0, band.start, w, band.stop)))
    return out


def _bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel of a source ``mode`` takes once decoded: ``pixels`` plus a separate ``rgb`` unless RGB."""
    if mode in ("L", "1"):
        return 1 + 3
    if mode in ("I", "F"):  # 16-bit grey once decoded, after a 32-bit copy and at most one float one
        return 4 + 4 + 2 + 3
    if mode in ("LA", "La") or mode.startswith("I"):
        return 2 + 3
    if mode in ("RGBA", "RGBa", "P", "PA"):  # P counted as RGBA: it may carry transparency
        return 4 + 3
    return 3  # RGB, and what is converted to it (CMYK, YCbCr, LAB, HSV, RGBX, F)


def decoded_nbytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Bytes ``decode(data)`` will hold in memory (``pixels``, ``rgb`` and ``stored_rgb``), from the header alone.

    0 when the header is unreadable or the photo is over ``max_pixels``: ``decode`` refuses those
    before decoding any pixel. Lets a caller reserve memory before the (large) decode happens.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                mode = img.mode
                deep = _deep_colour(img)  # read again at 16 bits a channel beside Pillow's copy
                # the view as shown is a copy of its own (colour.shown) where a profile, a gamma or transparency applies
                transparent = "transparency" in img.info
                # a JPEG's profile is its first complete one (decode's reading), which Pillow does not read
                # where the segments are more than one profile's
                icc = img.info.get("icc_profile") or (img.format in ("JPEG", "MPO") and _jpeg_icc(data))
                shown_copy = (bool(icc) or "gamma" in img.info or transparent
                              or mode in ("RGBA", "RGBa", "LA", "La", "PA"))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - whatever a hostile header trips in any of Pillow's plugins is decode's to report
        return 0
    if w * h > max_pixels:
        return 0
    # where the view as shown is a copy, the stored values' RGB view is kept too: the pixels themselves for
    # 8-bit RGB, a copy of its own for every other mode
    stored_copy = shown_copy and not (mode == "RGB" and not deep)
    dark_copy = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and transparent)  # over a dark page
    return w * h * (_bytes_per_pixel(mode) + (2 * len(mode) if deep else 0) + (3 if shown_copy else 0)
                    + (3 if stored_copy else 0) + (3 if dark_copy else 0)
                    + (3 if mode in _DEEP_GREY else 0))  # the last: _shadows16's view


def _orientation(exif: Image.Exif) -> int:
    """The EXIF Orientation (1-8); 1 (as stored) when the tag is missing or not one of those: a text,
    a list, a number out of range. Viewers ignore such a tag too, so the published photo shows what
    the original shows."""
    value = exif.get(ExifTags.Base.Orientation, 1)
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return 1
    return int(value) if value == int(value) and 1 <= value <= 8 else 1


def _shown_orientation(raw: bytes | None) -> int:
    """The Orientation of EXIF ``raw`` ("Exif\\0\\0" and its TIFF structure) as browsers read it: the
    first tag 274 of IFD0, a SHORT of count 1 (the EXIF spec's type) within 1-8, else 1. Pillow also
    reads it from a LONG, SSHORT or SLONG, or the first of several SHORTs, which browsers ignore
    (Chromium 156 shows such a photo as stored): a photo shown upright whose writer stored a stale
    Orientation 3 so was turned before detection and its plate missed, as with the stale tags
    browsers ignore elsewhere (a real held-out photo: no_plate)."""
    t = (raw or b"")[6:]
    order = {b"II*\x00": "little", b"MM\x00*": "big"}.get(t[:4])
    if order is None:
        return 1
    at = int.from_bytes(t[4:8], order)
    for k in range(int.from_bytes(t[at:at + 2], order) if at + 2 <= len(t) else 0):
        entry = t[at + 2 + 12 * k:at + 14 + 12 * k]
        if len(entry) < 12:
            break
        if int.from_bytes(entry[:2], order) == ExifTags.Base.Orientation:
            if int.from_bytes(entry[2:4], order) != 3 or int.from_bytes(entry[4:8], order) != 1:
                return 1
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


_XMP_INFO = ("xmp", "XML:com.adobe.xmp")  # where Pillow's plugins put a photo's XMP packet


def _forget_xmp(img: Image.Image) -> None:
    """Drop the XMP packet Pillow read (never written: the output is a fresh file), and the EXIF it
    read with it: Pillow adds XMP's ``tiff:Orientation`` to EXIF that has no Orientation (and turns a
    TIFF by it as it loads). Browsers, libvips and ImageMagick's auto-orient ignore XMP's, so a photo
    rotated upright by a tool that dropped its EXIF and left a stale XMP ``tiff:Orientation="6"``
    shows upright: turned by XMP's tag, it was detected sideways, its plate missed and published."""
    if [img.info.pop(k) for k in _XMP_INFO if k in img.info]:
        img._exif = None  # read again without XMP (a JPEG's open read it already, for its dpi)


def _to_uint16(a: np.ndarray, mode: str) -> np.ndarray:
    """32-bit integer ('I') or float ('F') grey pixels as uint16, keeping every level apart. Values
    within 0..65535 (integers) or 0..1 (floats, as float TIFFs store them and viewers show them)
    are kept (floats scaled by 65535); other ranges are scaled from their own minimum and maximum.
    Pillow's own conversion clipped floats at 0..255 (a 0..1 float TIFF: all black, published as
    checked with no plate) and the integers were clipped at 65535 (a photo of larger values: white)."""
    if mode == "F" and not np.isfinite(a).all():
        a = np.where(np.isfinite(a), a, 0).astype(np.float32)
    lo, hi = (a.min().item(), a.max().item()) if a.size else (0, 0)
    top = 65535 if mode == "I" else 1.0
    if lo < 0 or hi > top:  # scaled from its own range (float32: exact to 1 in 2**24)
        a = a.astype(np.float32, copy=mode != "F")
        a -= np.float32(lo)
        a *= np.float32(65535.0 / (hi - lo) if hi > lo else 0.0)
    elif mode == "F":
        a *= np.float32(65535.0)
    else:
        return a.astype(np.uint16)
    np.rint(a, out=a)  # in place: a float photo at the pixel ceiling is 1 GB a copy
    return np.clip(a, 0, 65535, out=a).astype(np.uint16)


def _deep_colour(img: Image.Image) -> bool:
    """A 16-bit RGB(A) PNG or TIFF, which Pillow reads as its high bytes (before ``img.load()``)."""
    if img.format not in ("PNG", "TIFF") or img.mode not in ("RGB", "RGBA") or not img.tile:
        return False
    args = img.tile[0].args
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and ";16" in rawmode


def _deep_colour_image(data: bytes, img: Image.Image) -> Image.Image:
    """``img`` (a 16-bit RGB(A) PNG or TIFF that Pillow loaded as its high bytes) with its colour read
    at full depth and reduced to 8 bits by its levels, as ``_view16`` does for grey: a 16-bit RGB file
    holding 8-bit values was all black in its high bytes, detected as no plate and published as a
    black copy. OpenCV turns a TIFF by its Orientation as Pillow's loader does, and leaves a PNG's
    eXIf to decode, as Pillow does (tests pin both). ``img`` itself when OpenCV reads the file
    otherwise than Pillow did (its size, channels or high bytes differ)."""
    import cv2  # here: what parses the DAGs imports this module, and only these files need OpenCV

    try:
        deep = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return img
    bands = len(img.getbands())
    if deep is None or deep.dtype != np.uint16 or deep.ndim != 3 or deep.shape[2] != bands:
        return img
    cv2.cvtColor(deep, cv2.COLOR_BGRA2RGBA if bands == 4 else cv2.COLOR_BGR2RGB, dst=deep)
    out = np.empty(deep.shape, np.uint8)
    np.right_shift(deep, 8, out=out, casting="unsafe")
    if out.shape[1::-1] != img.size or not np.array_equal(out, np.asarray(img)):
        return img
    # this is what is written (8 bits a channel), so only content within 12 bits is stretched: a dim
    # photo keeps its look (the detector finds plates in 12-bit content's high bytes, 0..15, not 0..3)
    out[..., :3] = _view16(deep[..., :3], span=1 << 12)  # alpha stays its high byte
    return Image.fromarray(out, img.mode)


def _white_is_zero(img: Image.Image) -> bool:
    """A 16- or 32-bit grey TIFF that stores white as 0 (PhotometricInterpretation 0). Pillow inverts
    such 1- and 8-bit TIFFs as it reads them, not these: the detector saw the photo's negative and it
    was published as one (a grey TIFF written back stores black as 0)."""
    tags = getattr(img, "tag_v2", None)
    return img.format == "TIFF" and img.mode in _DEEP_GREY and tags is not None and tags.get(262) == 0


_DEEP_GREY = ("I;16", "I;16B", "I;16L", "I", "F")


_TIFF_HEADERS = (b"II*\x00", b"MM\x00*")


def _exif_is_shown(img: Image.Image, early: bytes | None) -> bool:
    """Whether viewers turn the photo by the EXIF ``img.getexif()`` returned (``early``: a PNG's eXIf
    chunk read before its pixels, as Pillow keeps it: "Exif\0\0" before the chunk's data).
    A JPEG's or PNG's is not when its TIFF structure does not follow the one "Exif\0\0" the format
    puts before it (a JPEG's APP1) or none (a PNG's eXIf): Pillow skips a second "Exif\0\0" there (code
    that adds the header to Pillow's ``Exif.tobytes()``, which has it, writes two), browsers read no EXIF
    at all (Chromium 156: a real held-out photo shown upright with Orientation 3 so written was
    turned, its plate missed: no_plate, published turned and unmasked). A PNG's is not when it came from a text chunk "Raw profile type
    exif" (ImageMagick's way of keeping EXIF in a PNG), which browsers ignore, nor from an eXIf chunk
    after the pixels, which browsers ignore too (CSS Images 3: "UAs should ignore exif data that comes
    after image data"; PNG 3rd edition puts eXIf before IDAT; ExifTool writes it after by default).
    Pillow reads both: a photo shown upright with a stale Orientation 3 there was detected upside
    down (a real held-out photo: its plate missed, no_plate) and published turned."""
    if img.format == "PNG":
        raw = early
    elif img.format in ("JPEG", "MPO"):
        raw = img.info.get("exif")
        if raw is None:  # no APP1 EXIF: nothing of it turns the photo
            return True
    else:
        return True
    return raw is not None and raw[:6] == b"Exif\x00\x00" and raw[6:10] in _TIFF_HEADERS


def _normalise(img: Image.Image) -> tuple[np.ndarray, str]:
    m = img.mode
    if m in ("RGB", "RGBA", "L", "LA"):
        return _array(img), m
    if m in _DEEP_GREY:
        a = np.array(img)
        if m in ("I", "F"):  # 32-bit integers or floats: written as 16-bit grey
            a = _to_uint16(a, m)
        return a.astype(np.uint16), "I;16"
    if m == "1":
        return np.array(img.convert("L")), "L"
    if m == "P" or m == "PA":
        conv = img.convert("RGBA") if ("transparency" in img.info or m == "PA") else img.convert("RGB")
        return _array(conv), conv.mode
    if m == "CMYK":  # written back as RGB: masked pixels are computed in RGB
        return _array(img.convert("RGB")), "RGB"
    if m in ("I;16S", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        conv = img.convert("RGBA" if m in ("RGBa", "La") else "RGB")  # LAB has no alpha, whatever its "A"
        return _array(conv), conv.mode
    raise ImageError("unsupported_mode", f"pixel mode {m!r} is not supported")


def decode_failure(exc: Exception) -> ImageError:
    """An exception decoding one photo raised as that photo's failure (an ImageError as it is; any
    other as ``corrupt``, with what to do): the decoder's own last resort, and that of the job loop
    and the container around it, so one hostile file never fails a shard or a transform job."""
    if isinstance(exc, ImageError):
        return exc
    return ImageError("corrupt", f"cannot decode ({type(exc).__name__}: {exc}); the file is damaged or unusual: "
                      "re-export it as a plain JPEG or PNG and mask that")


# ISO base media (HEIF) brands in a file's ``ftyp`` box: phones' photo formats Pillow cannot read.
_HEIF_BRANDS = {b"heic": "HEIC (HEIF with HEVC: an iPhone's default photo format)", b"heix": "HEIC", b"heim": "HEIC",
                b"heis": "HEIC", b"hevc": "HEIC", b"hevx": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
                b"avif": "AVIF", b"avis": "AVIF"}


_ICC_MAX = 64 << 20  # the largest ICC profile read from a PNG (Pillow refuses a larger one first)


def _png_colour_chunks(data: bytes) -> tuple[bytes | None, bool, float | None]:
    """A PNG's ICC profile, whether it has an sRGB chunk, and its gAMA, as browsers read them: the
    first of each before the pixels (IDAT). Pillow keeps the last iCCP, and reads those after the
    pixels as they load: a photo stored as 16 dark levels under a first profile that shows it at
    full range (Chromium 156 shows it so) and a second, sRGB one before or after IDAT was seen by
    the detector in its dark stored values (a real held-out photo: no_plate, found at 0.98 under
    the first profile alone) and published with its plate in those levels, the sRGB profile kept."""
    icc, srgb, gamma, seen, i = None, False, None, set(), 8
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        body = data[i + 8:i + 8 + length]
        if kind not in seen:
            seen.add(kind)
            if kind == b"iCCP":
                at = body.find(b"\0")
                if 0 <= at and body[at + 1:at + 2] == b"\0":
                    try:
                        inflate = zlib.decompressobj()
                        icc = inflate.decompress(body[at + 2:], _ICC_MAX) or None
                    except zlib.error:  # a profile that cannot be read: viewers show the stored values
                        icc = None
            elif kind == b"sRGB":
                srgb = True
            elif kind == b"gAMA" and length == 4:
                gamma = int.from_bytes(body, "big") / 100000.0 or None
        i += 12 + length
    return icc, srgb, gamma


def _next_marker(data: bytes, i: int) -> int:
    """The position (of its last 0xFF) of the first JPEG marker at or after ``i`` in ``data``, as
    libjpeg's next_marker finds it, or len(data): bytes that are not 0xFF and stuffed FF 00 pairs are
    skipped (extraneous data: libjpeg warns and reads on, as do Pillow and browsers; writers that
    pad a segment leave such bytes), then fill bytes (repeated 0xFF)."""
    end = len(data)
    while True:
        i = data.find(b"\xff", i)
        if i < 0:
            return end
        while i + 1 < end and data[i + 1] == 0xFF:
            i += 1
        if i + 1 < end and data[i + 1] == 0x00:
            i += 2
            continue
        return i


def _jpeg_segments(data: bytes):
    """(marker, position of its 0xFF, length) of each segment of JPEG ``data`` that has a length, in
    order, as libjpeg walks them (``_next_marker``: past bytes that are no marker, such as a scan's
    entropy-coded data, its stuffed FF 00 pairs and fill bytes), to the end of the image (EOI) or of
    the data; markers without a length (restarts RSTn, TEM) are stepped over."""
    i, end = 2, len(data)
    while True:
        i = _next_marker(data, i)
        if i + 4 > end:
            return
        m = data[i + 1]
        if m == 0xD9:  # EOI
            return
        if 0xD0 <= m <= 0xD7 or m == 0x01:  # no length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        yield m, i, length
        i += 2 + length


def _jpeg_icc(data: bytes) -> bytes | None:
    """A JPEG's ICC profile as browsers read it: the first complete one of its APP2 ICC_PROFILE
    segments (their count set by the first, each sequence number taken once, in order of number).
    Pillow gives none when the segments are more than one profile's: a photo stored in dark levels
    under a first profile that shows them at full range (Chromium 156 shows the plate) and a second,
    sRGB one was seen by the detector in its dark stored values alone."""
    chunks: dict[int, bytes] = {}
    count = 0
    for m, i, length in _jpeg_segments(data):
        if m == 0xDA:  # the pixels: the profile comes before them
            break
        body = data[i + 4:i + 2 + length]
        if m == 0xE2 and body[:12] == b"ICC_PROFILE\0" and len(body) >= 14:
            seq, n = body[12], body[13]
            count = count or n
            if n == count and 1 <= seq <= count and seq not in chunks:
                chunks[seq] = body[14:]
                if len(chunks) == count:
                    return b"".join(chunks[k] for k in range(1, count + 1)) or None
    return None


def _started_as(data: bytes) -> str:
    """The supported format ``data`` starts as (its signature), or ''. A truncated TIFF written with
    compression (libtiff puts the directory after the pixels) failed 'not_an_image', saying "check
    that it is a photo, or move it out of the source": an upload cut short, reported as not a photo."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return ""


def _unsupported_kind(data: bytes) -> str:
    """The name of a known photo format Pillow does not read (HEIC/HEIF, AVIF, JPEG XL), or ''."""
    if data[4:8] == b"ftyp":
        brands = [data[8:12]] + [data[i:i + 4] for i in range(16, min(len(data), 64), 4)]
        for b in brands:
            if b in _HEIF_BRANDS:
                return _HEIF_BRANDS[b] + " data"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL data"
    return ""


# Browsers show a WebP as stored: none applies its EXIF Orientation (Chromium 156 checked; the
# same for Firefox and Safari per zpl.fi's survey), while Pillow, libvips and ImageMagick's -auto-orient
# turn it. Turned, a photo shown upright with a stale Orientation 3 or 6 had its plate read upside
# down or on end by the detector (a real held-out photo: 0.98 upright, no_plate turned) and was
# published unmasked; left as stored, a phone photo converted with its Orientation 6 kept (cwebp
# -metadata exif) is seen with its plate on end. The detector looks at one orientation, so such a
# photo fails with what to do.
_WEBP_ORIENTATION = (
    "WebP with EXIF Orientation {}: browsers show a WebP as stored (they ignore its EXIF orientation) while "
    "other tools turn it, so which way its plates read cannot be told and it is not masked; re-export it "
    "with the orientation applied and reset (e.g. 'magick in.webp -auto-orient out.jpg') or, if it already "
    "shows upright as stored, with the tag removed ('exiftool -Orientation= in.webp'), and mask that")


# Each scan of a progressive JPEG is decoded over the whole photo, and libjpeg decodes repeated scans
# with a warning: a 123 KB upload of a 12 MP photo whose last 26-byte scan was repeated 2,000 times
# took 16 s to decode (8 ms a scan; 50 ms at 80 MP; a 10 MB one hours). Encoders write 3 to ~30.
MAX_JPEG_SCANS = 256


def _jpeg_scans(data: bytes, cap: int = MAX_JPEG_SCANS) -> int:
    """The scans (SOS segments) of the first image in JPEG ``data``, counted up to ``cap`` + 1, walking
    its segments (a scan's entropy-coded data is passed over as bytes that are no marker)."""
    n = 0
    for m, _, _ in _jpeg_segments(data):
        if m == 0xDA:
            n += 1
            if n > cap:
                break
    return n


FRAME_COUNT_CAP = 1000  # a TIFF's pages are counted up to this many (more: the count says so)


def _frame_count(img: Image.Image) -> int:
    """The number of frames or pages of ``img``; for a TIFF counted page by page, up to
    FRAME_COUNT_CAP + 1. Pillow's ``n_frames`` walks every page of a TIFF, checking each against all
    the pages before it (quadratic): a 5.7 MB TIFF of 50,000 one-pixel pages held the decoder, and
    the interpreter lock with it, for 16 s, a 34 MB one of 300,000 for minutes: a nightly run's
    worker stalled on one upload. MPO, APNG and WebP declare their count in a header."""
    if img.format != "TIFF":
        return getattr(img, "n_frames", 1)
    n = 1
    try:
        while n <= FRAME_COUNT_CAP:
            img.seek(n)
            n += 1
    except EOFError:
        pass
    return n


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``data``; raise ImageError with a reason code for anything unusable."""
    check_max_pixels(max_pixels)
    if not data:
        raise ImageError("empty_file", "file is empty (0 bytes): copy or upload the photo again")
    frames_dropped = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or ""
            if fmt not in SUPPORTED_FORMATS and fmt not in READ_AS:
                raise ImageError("unsupported_format", f"format {fmt or 'unknown'} is not supported "
                                 f"(supported: {', '.join([*SUPPORTED_FORMATS, *READ_AS])}); convert it to JPEG or PNG and mask that")
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("too_large", f"{w}x{h} = {w * h:,} pixels exceeds the limit of "
                                 f"{max_pixels:,}: if this is a real photo, downscale it, or mask it with the CLI's --max-pixels "
                                 f"raised (up to {MAX_PIXELS_CEILING:,})")
            frames = _frame_count(img)
            if fmt in READ_AS:  # MPO: phone JPEG + MP extension: the first frame is the photo, the rest previews/depth
                fmt, frames_dropped = READ_AS[fmt], frames - 1
            elif frames > 1:  # masking one page and dropping (or passing through) the others would lose or leak
                count = f"{frames}" if frames <= FRAME_COUNT_CAP else f"more than {FRAME_COUNT_CAP}"
                raise ImageError("multi_page_unsupported", f"{fmt} file with {count} pages/frames: only single-image "
                                 "files are masked (a page left out would be lost, one passed through would leak); "
                                 "split it into one file per page or frame (e.g. 'magick in.tif page-%d.tif') "
                                 "and mask those")
            img.seek(0)
            if fmt == "JPEG" and img.info.get("progressive") and _jpeg_scans(data) > MAX_JPEG_SCANS:
                raise ImageError("corrupt", f"progressive JPEG with more than {MAX_JPEG_SCANS} scans (an encoder "
                                 "writes a few dozen at most; each scan is decoded over the whole photo, so "
                                 "this one would hold a worker for minutes): re-save it as a plain JPEG "
                                 "(e.g. 'jpegtran -copy all in.jpg > out.jpg') and mask that")
            _forget_xmp(img)
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            # the encoded bytes to the decoder in one piece, not in 64 KB reads: every read hands the
            # interpreter lock over and waits to get it back (milliseconds while the detector's
            # thread runs Python; bench/bench_gil.py). Capped: the read is a transient copy
            img.decodermaxblock = max(img.decodermaxblock, min(len(data), DECODE_READ_MAX))
            deep = _deep_colour(img)
            early_exif = img.info.get("exif")  # a PNG's eXIf before its pixels (one after is read as they load)
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        known = _unsupported_kind(data)
        if known:
            raise ImageError("unsupported_format", f"{known} is not supported (supported: "
                             f"{', '.join([*SUPPORTED_FORMATS, *READ_AS])}); convert it to JPEG and mask that "
                             "(an iPhone saves JPEG with Settings > Camera > Formats > Most Compatible)") from None
        started = _started_as(data)
        if started:  # a photo's start, cut short or damaged after it (a TIFF's directory is often at its end)
            raise ImageError("corrupt", f"starts as a {started} file but cannot be read ({len(data):,} bytes): it "
                             "is damaged or cut short; copy or upload the original again") from None
        raise ImageError("not_an_image", "not a recognisable image file (not JPEG, PNG, WebP or TIFF data, whatever its name says): check that it is a photo, or move it out of the source") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", f"refused as a decompression bomb: its header declares more pixels than "
                         f"{MAX_PIXELS_CEILING:,}, the most --max-pixels allows; if it is a real photo, split or "
                         f"downscale it first ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageError(reason, f"cannot decode: {exc}; the file is damaged or cut short: copy or upload the "
                         "original again") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's surprise at a hostile header (DDS: NotImplementedError)
        raise decode_failure(exc) from None
    try:
        _forget_xmp(img)  # a PNG's XMP after its pixels is read as they load
        exif = img.getexif()
        if not _exif_is_shown(img, early_exif):
            orientation = 1
        elif fmt in ("JPEG", "PNG"):  # read as browsers read it (a WebP's fails below, a TIFF's is Pillow's)
            orientation = _shown_orientation(early_exif if fmt == "PNG" else img.info.get("exif"))
        else:
            orientation = _orientation(exif)
        if fmt == "WEBP" and orientation != 1:
            raise ImageError("ambiguous_orientation", _WEBP_ORIENTATION.format(orientation))
        subsampling = JpegImagePlugin.get_sampling(img) if isinstance(img, JpegImagePlugin.JpegImageFile) else -1
        if fmt == "PNG":  # as browsers read them: the first before the pixels
            icc, srgb, gamma = _png_colour_chunks(data)
        elif fmt == "JPEG":  # the first complete profile, as browsers read it
            icc, srgb, gamma = _jpeg_icc(data), False, None
        else:
            icc, srgb, gamma = img.info.get("icc_profile"), "srgb" in img.info, img.info.get("gamma")
        if icc and _holds_image(icc):  # a copy of a photo planted there: never published, nor looked through
            icc = None
        # a PNG's gAMA is what viewers apply only without an ICC profile or sRGB chunk
        png_gamma = None if (icc or srgb) else gamma
        method = _UPRIGHT.get(orientation)
        negative = _white_is_zero(img)
        if deep:
            img = _deep_colour_image(data, img)
        if method is not None:  # no copy when already upright (ImageOps.exif_transpose copies the whole photo)
            img = img.transpose(method)
        pixels, mode = _normalise(img)
        if negative:
            np.subtract(65535, pixels, out=pixels)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a hostile file trips over after its pixels loaded is its own failure
        raise decode_failure(exc) from None
    img.close()  # the Pillow copy (4 bytes a pixel for RGB) goes before the RGB view is made
    del img
    pixels = np.ascontiguousarray(pixels)
    alpha = pixels[..., -1] if mode in ("RGBA", "LA") else None
    stored = _to_rgb8(pixels)
    rgb = shown(stored, icc, png_gamma, alpha)
    both = rgb is not stored and may_hide(icc, png_gamma, alpha)
    dark = shown(stored, icc, png_gamma, alpha, DARK_BACKDROP) if alpha is not None and alpha.min() < 255 else None
    # 16-bit grey is written at 16 bits as PNG and TIFF (JPEG and WebP write the high byte the view shows)
    shadows = _shadows16(pixels) if pixels.dtype == np.uint16 and fmt in ("PNG", "TIFF") else None
    return Decoded(pixels=pixels, mode=mode, format=fmt, rgb=rgb, exif=exif, icc_profile=icc, orientation=orientation,
                   frames_dropped=frames_dropped, subsampling=subsampling, stored_rgb=stored if both else None,
                   dark_rgb=dark,
                   shadows_rgb=None if shadows is None else np.repeat(shadows[..., None], 3, axis=2))


# The start of an image inside a metadata value: a JPEG's or a PNG's, raw or in base64 (XMP's
# xmpGImg:image). Makers' notes carry a preview of the photo (Nikon's, Olympus', Pentax'), Photoshop's
# image resources (0x8649) a thumbnail, XMP thumbnails: unmasked copies, like IFD1's.
_IMAGE_STARTS = (b"\xff\xd8\xff", b"/9j/", b"\x89PNG\r\n\x1a\n", b"iVBORw0KGgo")
# The starts of the other formats a copy of the photo can be planted in (TIFF, WebP, GIF, BMP,
# Photoshop, JPEG 2000, QOI, PNM): only JPEG's and PNG's were looked for, so a TIFF, WebP, GIF or BMP
# copy of the unmasked photo in a JPEG's ICC profile was published under the default policy (and in
# any EXIF value under 'keep'). Their starts occur by chance in binary values (a Nikon maker note is
# itself a TIFF structure): they count only where an image opens there.
_OTHER_IMAGE_STARTS = (b"II*\x00", b"MM\x00*", b"RIFF", b"GIF87a", b"GIF89a", b"BM", b"8BPS",
                       b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51", b"qoif", b"P5", b"P6")
# Containers of formats Pillow does not open (HEIF/AVIF, JPEG XL), whose signatures do not occur by chance
_IMAGE_SIGNATURES = (b"ftypheic", b"ftypheix", b"ftypheim", b"ftypheis", b"ftypmif1", b"ftypavif", b"ftypavis",
                     b"\x00\x00\x00\x0cJXL \r\n\x87\n")
_BMP_HEADERS = {12, 16, 40, 52, 56, 64, 108, 124}


def _no_images(tags: dict) -> dict:
    """``tags`` but those whose value holds an embedded image."""
    def holds_image(v) -> bool:
        if isinstance(v, str):  # Pillow reads a text tag's bytes as latin-1: those are the original's
            # (an ASCII text is the same bytes in both: looked through once)
            return any(holds_image(b) for b in {v.encode(codec, "replace") for codec in ("latin-1", "utf-8")})
        return isinstance(v, (bytes, bytearray)) and (any(start in v for start in _IMAGE_STARTS)
                                                       or _holds_image(bytes(v)))
    return {k: v for k, v in tags.items() if not holds_image(v)}


# Tags that describe how the original's pixels are stored (a TIFF's EXIF is its own first directory):
# size, samples, colour model, compression, strips and tiles, palette. 'keep' copied them, and
# Pillow's TIFF writer took them over its own: a TIFF turned by its orientation came out with the
# original's width (rows sheared), a CMYK, palette or float TIFF as a file no reader opens.
_LAYOUT_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277, 278, 279, 280, 281, 284, 288, 289,
    290, 291, 292, 293, 301, 317, 320, 321, 322, 323, 324, 325, 330, 332, 333, 334, 336, 338, 339, 340,
    341, 342, 347, *range(512, 522), 529, 530, 531, 532, 32995, 32996, 32997, 32998, 34675,
})


# Tags whose value holds the photo's pixels in a form _IMAGE_STARTS does not see: Photoshop's image
# resources (34377: its thumbnail resource may be raw RGB) and its layers (37724, ImageSourceData: the
# layers' own pixels, unmasked). 'keep' drops them wherever they are.
_PIXEL_TAGS = frozenset({34377, 37724})


def _readable(read) -> dict:
    """The tags of the directory ``read()`` returns that Pillow can read. Pillow reads a tag when it
    is first asked for, and some it refuses then (a PhotometricInterpretation of 2 values: KeyError):
    in encode that failed the photo as a write_error on every run, under any policy but strip."""
    try:
        ifd = read()
    except Exception:  # noqa: BLE001 - an unreadable sub-directory is not written
        return {}
    tags = {}
    for k in list(ifd):
        try:
            tags[k] = ifd[k]
        except Exception:  # noqa: BLE001 - nor is an unreadable tag
            continue
    return tags


def _exif_for_output(exif: Image.Exif | None, policy: MetadataPolicy) -> bytes | None:
    if exif is None or policy == "strip" or not len(exif):
        return None
    top = _readable(lambda: exif)
    sub = _readable(lambda: exif.get_ifd(ExifTags.IFD.Exif))
    gps: dict = {}
    if policy == "safe":
        ifd0 = {k: v for k, v in top.items() if k in SAFE_IFD0}
        kept = {k: v for k, v in sub.items() if k in SAFE_EXIF_IFD}
    else:  # keep: all but the previews of the photo, wherever they are (IFD1, makers' notes, ...)
        ifd0 = _no_images({k: v for k, v in top.items() if k not in _LAYOUT_TAGS and k not in _PIXEL_TAGS and k not in (
            ExifTags.IFD.GPSInfo, ExifTags.IFD.Exif, ExifTags.IFD.Interop, ExifTags.Base.Orientation)})
        kept = _no_images({k: v for k, v in sub.items() if k not in _PIXEL_TAGS})
        gps = _no_images(_readable(lambda: exif.get_ifd(ExifTags.IFD.GPSInfo)))
    try:
        return _exif_bytes(ifd0, kept, gps)
    except Exception:  # noqa: BLE001 - a value Pillow cannot write as its tag's type (a Make stored as a
        # rational, a ResolutionUnit over 65535: buggy writers leave such tags) failed the photo as a
        # write_error, on every run: those tags go, the photo is published with the rest
        return _exif_bytes({k: v for k, v in ifd0.items() if _exif_writes({k: v}, {}, {})},
                           {k: v for k, v in kept.items() if _exif_writes({}, {k: v}, {})},
                           {k: v for k, v in gps.items() if _exif_writes({}, {}, {k: v})})


def _exif_bytes(ifd0: dict, kept: dict, gps: dict) -> bytes:
    """EXIF of IFD0 ``ifd0`` (Orientation 1), with the Exif IFD ``kept`` and the GPS IFD ``gps``."""
    out = Image.Exif()
    out.update(ifd0)
    if gps:
        out.get_ifd(ExifTags.IFD.GPSInfo).update(gps)
    if kept:
        out.get_ifd(ExifTags.IFD.Exif).update(kept)
    out[ExifTags.Base.Orientation] = 1  # pixels are already upright
    return out.tobytes()  # IFD1 (the embedded thumbnail: an unmasked copy) is never written


def _exif_writes(ifd0: dict, kept: dict, gps: dict) -> bool:
    try:
        _exif_bytes(ifd0, kept, gps)
    except Exception:  # noqa: BLE001 - whatever Pillow's writer raises: that tag is not written
        return False
    return True


# the ICC colour space signature (header bytes 16-20) that describes each output mode's pixels
_ICC_SPACE = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY", "LA": b"GRAY"}


def icc_for_output(icc: bytes | None, mode: str) -> bytes | None:
    """The original's ICC profile when it describes pixels of ``mode``, else None. A CMYK or Lab
    photo is written as RGB (converted without colour management), so its profile would tell a
    colour-managed viewer to read RGB pixels as CMYK or Lab: the photo would show in wrong colours
    or not at all. 16-bit grey keeps none (as before)."""
    if not icc or len(icc) < 20 or _holds_image(icc):
        return None
    return icc if icc[16:20] == _ICC_SPACE.get(mode) else None


def _holds_image(blob: bytes, depth: int = 0, tries: list[int] | None = None) -> bool:
    """Whether ``blob`` (an ICC profile: kept under every policy but strip, and any tag or trailing
    bytes in it copied as they are; an EXIF value under 'keep') carries an image: one Pillow can open
    (JPEG, PNG, TIFF, WebP, GIF, BMP, ...), raw or in base64, or a HEIF/AVIF/JPEG XL container, such
    as an unmasked copy of the photo planted there. Only an image that opens counts: a 16-bit tone
    curve near white holds the bytes FF D8 FF by chance, and dropping such a profile would only dull
    the photo's colours (a profile with more than 256 such starts goes unopened: ``tries``, the count
    the base64 runs looked through share with the blob they are in, so a profile of many short runs
    of image starts is not 256 tries a run: 11,000 such runs in a 1 MB profile held decode 13 s)."""
    import base64
    import binascii
    import re

    def opens(data: bytes) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as img:
                    return img.size[0] * img.size[1] > 0
        except Exception:  # noqa: BLE001 - what does not open as an image is not one
            return False

    def plausible(start: bytes, at: int) -> bool:  # cheap checks for the two-byte starts (common by chance)
        if start == b"BM":
            return int.from_bytes(blob[at + 14:at + 18], "little") in _BMP_HEADERS
        if start in (b"P5", b"P6"):
            return blob[at + 2:at + 3] in (b" ", b"\t", b"\n", b"\r")
        return True

    if any(sig in blob for sig in _IMAGE_SIGNATURES):
        return True
    tries = [0] if tries is None else tries
    for start in _IMAGE_STARTS + _OTHER_IMAGE_STARTS:
        at = blob.find(start)
        while at >= 0:
            if not plausible(start, at):
                at = blob.find(start, at + 1)
                continue
            tries[0] += 1
            if tries[0] > 256:  # a profile made of image starts: not one any camera or editor writes
                return True
            if start[:1] in (b"/", b"i"):  # base64: the run of base64 characters from there, decoded
                run = re.match(rb"[A-Za-z0-9+/=\r\n]+", blob[at:at + (64 << 20)]).group()
                try:
                    data = base64.b64decode(re.sub(rb"[\r\n]", b"", run) + b"==", validate=False)
                except (binascii.Error, ValueError):
                    data = b""
            else:
                data = blob[at:]
            if opens(data):
                return True
            at = blob.find(start, at + 1)
    if depth == 0:  # an image of any of those formats in base64 (a run of 64 or more base64 characters)
        for run in re.finditer(rb"[A-Za-z0-9+/\r\n]{64,}", blob):
            text = re.sub(rb"[\r\n]", b"", run.group())
            text = text[:len(text) - (len(text) % 4 == 1)]
            try:
                data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=False)
            except (binascii.Error, ValueError):
                continue
            if _holds_image(data, depth=1, tries=tries):
                return True
    return False


def output_subsampling(dec: Decoded, jpeg_quality: int) -> int:
    """Chroma subsampling of a masked JPEG: a 4:2:0 original (what phones and cameras write) stays
    4:2:0, as 4:4:4 would only store its upsampled chroma again (bigger, and slower to encode); any
    other original gets 4:4:4 at quality 90 and above (4:2:2 too: after an EXIF rotation its
    halved axis is no longer the one 4:2:2 halves), 4:2:0 below."""
    if dec.subsampling == 2:
        return 2
    return 0 if jpeg_quality >= 90 else 2


def encode(dec: Decoded, pixels: np.ndarray, *, jpeg_quality: int = 92, metadata: MetadataPolicy = DEFAULT_METADATA_POLICY) -> bytes:
    """Encode masked ``pixels`` in ``dec``'s format and mode with the metadata policy applied."""
    img = Image.fromarray(pixels)  # uint16 2-D arrays become I;16
    fmt = dec.format
    params: dict = {}
    exif = _exif_for_output(dec.exif, metadata)
    if fmt == "JPEG":
        if img.mode in ("RGBA", "LA"):
            img = img.convert(img.mode[:-1])
        elif img.mode == "I;16":
            img = Image.fromarray((pixels >> 8).astype(np.uint8))
        params.update(quality=int(jpeg_quality), optimize=False, subsampling=output_subsampling(dec, jpeg_quality))
    elif fmt == "WEBP":
        if img.mode == "I;16":
            img = Image.fromarray((pixels >> 8).astype(np.uint8))
        params.update(quality=int(jpeg_quality))
    elif fmt == "PNG":
        params.update(compress_level=6)
    if exif:
        params["exif"] = exif
    icc = icc_for_output(dec.icc_profile, img.mode)
    if icc:
        params["icc_profile"] = icc
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def extension_supported(key: str) -> bool:
    return key.lower().endswith(EXTENSIONS)


def content_type(fmt: str) -> str:
    return {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff"}.get(fmt, "application/octet-stream")
