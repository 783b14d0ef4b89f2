import io

import numpy as np
import pytest
from PIL import ExifTags, Image

from platemask.imageio import ImageError, decode, encode

from conftest import exif_orientation_jpeg, jpeg_bytes, png_bytes

W, H = 64, 40  # stored (raw) size; a red dot at raw (x=10, y=5)


def _raw_with_marker():
    a = np.full((H, W, 3), 30, np.uint8)
    a[3:8, 8:13] = (255, 0, 0)
    return a


def _expected_position(orientation):
    """Where raw pixel (x, y) lands after applying EXIF orientation (the EXIF 2.3 definitions)."""
    x, y = 10, 5
    return {
        1: (x, y, W, H),
        2: (W - 1 - x, y, W, H),
        3: (W - 1 - x, H - 1 - y, W, H),
        4: (x, H - 1 - y, W, H),
        5: (y, x, H, W),
        6: (H - 1 - y, x, H, W),
        7: (H - 1 - y, W - 1 - x, H, W),
        8: (y, W - 1 - x, H, W),
    }[orientation]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_baked_in(orientation):
    img = Image.fromarray(_raw_with_marker())
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    dec = decode(buf.getvalue())
    ex, ey, ew, eh = _expected_position(orientation)
    assert (dec.width, dec.height) == (ew, eh)
    ys, xs = np.nonzero(dec.rgb[..., 0] > 200)
    assert abs(xs.mean() - ex) <= 1 and abs(ys.mean() - ey) <= 1
    assert dec.orientation == orientation
    out = Image.open(io.BytesIO(encode(dec, dec.pixels, metadata="keep")))
    assert out.size == (ew, eh)
    assert out.getexif().get(ExifTags.Base.Orientation, 1) == 1  # upright pixels, no second rotation


@pytest.mark.parametrize("typ,count,value4", [
    (2, 4, b"abc\0"),  # text: crashed the decoder (ValueError) and with it a whole shard or transform job
    (2, 1, b"\0\0\0\0"),  # empty text
    (3, 1, b"\x09\0\0\0"),  # 9: no such orientation
    (3, 1, b"\0\0\0\0"),  # 0
    (4, 1, b"\xff\xff\xff\x7f"),  # a huge LONG
])
def test_an_unusable_exif_orientation_is_read_as_stored(typ, count, value4):
    """Viewers ignore an Orientation tag that is not 1-8, so the photo is masked as stored."""
    data = exif_orientation_jpeg(typ, count, value4)
    dec = decode(data)
    assert dec.orientation == 1 and dec.rgb.shape == (64, 96, 3)
    assert np.array_equal(dec.rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


XMP_ORIENTATION_6 = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                     b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
                     b'</rdf:RDF></x:xmpmeta>')


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "PNG after its pixels", "WEBP", "TIFF"])
@pytest.mark.parametrize("with_exif", [False, True])
def test_a_stale_xmp_orientation_does_not_turn_the_photo(fmt, with_exif):
    """Pixels rotated upright by a tool that dropped EXIF's Orientation but left XMP's
    tiff:Orientation="6": viewers go by EXIF and show the photo upright. Pillow's getexif falls back
    to XMP's tag (its TIFF loader turns the pixels by it), so the photo was detected turned 90
    degrees (the model missed its sideways plate: no_plate) and published turned. It is read as
    stored, as viewers show it."""
    raw = _raw_with_marker()
    exif = Image.Exif()
    if with_exif:  # EXIF without an Orientation (a JPEG's open reads it already, for its dpi)
        exif[ExifTags.Base.Make] = "Acme"
    buf = io.BytesIO()
    kw = {"xmp": XMP_ORIENTATION_6}
    if fmt.startswith("PNG"):
        kw = {}
    elif fmt == "TIFF":
        kw = {"tiffinfo": {700: XMP_ORIENTATION_6}}
    Image.fromarray(raw).save(buf, format=fmt.split()[0], exif=exif.tobytes(), quality=95, **kw)
    data = buf.getvalue()
    if fmt.startswith("PNG"):  # an iTXt chunk, as Adobe's tools write it, before or after the pixels
        itxt = _png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + XMP_ORIENTATION_6)
        at = data.index(b"IDAT") - 4 if fmt == "PNG" else len(data) - 12
        data = data[:at] + itxt + data[at:]
    assert XMP_ORIENTATION_6 in data
    dec = decode(data)
    assert dec.orientation == 1 and (dec.width, dec.height) == (W, H)
    ys, xs = np.nonzero(dec.rgb[..., 0] > 200)
    assert abs(xs.mean() - 10) <= 1 and abs(ys.mean() - 5) <= 1
    out = Image.open(io.BytesIO(encode(dec, dec.pixels, metadata="keep")))
    assert out.size == (W, H) and out.getexif().get(ExifTags.Base.Orientation, 1) == 1


def test_jpeg_in_jpeg_out_with_quality():
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    dec = decode(jpeg_bytes(rgb))
    hi = encode(dec, dec.pixels, jpeg_quality=95)
    lo = encode(dec, dec.pixels, jpeg_quality=30)
    assert Image.open(io.BytesIO(hi)).format == "JPEG"
    assert len(lo) < len(hi)


@pytest.mark.parametrize("source,quality,want", [(2, 92, 2), (0, 92, 0), (1, 92, 0), (2, 80, 2), (0, 80, 2)])
def test_a_masked_jpeg_keeps_a_4_2_0_originals_chroma_and_never_drops_finer_chroma_at_high_quality(source, quality, want):
    """Phones write 4:2:0: writing it back as 4:4:4 stores the upsampled chroma again (larger, slower)
    and adds nothing. A 4:4:4 or 4:2:2 original keeps full chroma at quality >= 90."""
    from PIL import JpegImagePlugin

    rgb = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling=source)
    dec = decode(buf.getvalue())
    assert dec.subsampling == source
    out = Image.open(io.BytesIO(encode(dec, dec.pixels, jpeg_quality=quality)))
    assert JpegImagePlugin.get_sampling(out) == want


def test_png_in_png_out_lossless():
    rgb = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    dec = decode(png_bytes(rgb))
    out = Image.open(io.BytesIO(encode(dec, dec.pixels)))
    assert out.format == "PNG" and np.array_equal(np.asarray(out), rgb)


def test_cmyk_jpeg_is_decoded_to_rgb():
    img = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # red in CMYK
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    dec = decode(buf.getvalue())
    assert dec.mode == "RGB"  # CMYK is written as RGB
    r, g, b = dec.rgb[15, 20].astype(int)
    assert r > 200 and g < 60 and b < 60
    assert Image.open(io.BytesIO(encode(dec, dec.pixels))).mode == "RGB"


def test_16bit_grey_png_keeps_its_depth():
    a = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27)
    dec = decode(png_bytes(a))
    assert dec.mode == "I;16" and dec.pixels.dtype == np.uint16
    assert dec.rgb.dtype == np.uint8 and dec.rgb.shape == (40, 60, 3)
    back = np.asarray(Image.open(io.BytesIO(encode(dec, dec.pixels))))
    assert np.array_equal(back.astype(np.uint16), a)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "1"])
def test_other_modes(mode):
    img = Image.new("RGB", (30, 20), (200, 10, 10)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    dec = decode(buf.getvalue())
    assert dec.rgb.shape == (20, 30, 3)
    assert Image.open(io.BytesIO(encode(dec, dec.pixels))).size == (30, 20)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"hello, this is a text file\n" * 10, "not_an_image"),
    (b"GIF89a" + b"\x00" * 100, None),  # GIF header: either not decodable or an unsupported format
])
def test_bad_inputs_have_reasons(data, reason):
    with pytest.raises(ImageError) as e:
        decode(data)
    if reason:
        assert e.value.reason == reason
    assert str(e.value)


@pytest.mark.parametrize("head,named", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),  # an iPhone photo
    (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heicmiaf", "HEIF"),  # major brand generic, HEVC inside
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "AVIF"),
    (b"\xff\x0a\xfa\x7f\x01\x90\x08", "JPEG XL"),
], ids=["heic", "heif", "avif", "jxl"])
def test_a_phone_format_pillow_cannot_read_is_named_with_what_to_do(head, named):
    """A HEIC photo (what an iPhone saves by default) failed as 'not a recognisable image file ...
    check that it is a photo': the operator was told it may not be a photo. It is one, in a format
    the pipeline does not read: the record says which, and how to get a JPEG."""
    with pytest.raises(ImageError) as e:
        decode(head + bytes(range(256)) * 4)
    assert e.value.reason == "unsupported_format"
    assert named in str(e.value) and "convert it to JPEG" in str(e.value)


def test_truncated_jpeg_fails():
    rgb = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    data = jpeg_bytes(rgb)
    with pytest.raises(ImageError) as e:
        decode(data[: len(data) // 2])
    assert e.value.reason in ("truncated", "corrupt")


def test_pixel_limit_refuses_before_decoding():
    data = png_bytes(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageError) as e:
        decode(data, max_pixels=5000)
    assert e.value.reason == "too_large" and "10,000 pixels" in str(e.value)


def _exif_with_gps_and_serial():
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Acme"
    exif[ExifTags.Base.Artist] = "Jane Inspector"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({1: "N", 2: (52.0, 22.0, 0.0)})
    exif.get_ifd(ExifTags.IFD.Exif).update({ExifTags.Base.BodySerialNumber: "SN-12345",
                                            ExifTags.Base.ExposureTime: 0.01})
    return exif


@pytest.mark.parametrize("policy", ["strip", "safe", "keep"])
def test_metadata_policy(policy):
    rgb = np.full((40, 60, 3), 100, np.uint8)
    dec = decode(jpeg_bytes(rgb, exif=_exif_with_gps_and_serial().tobytes()))
    out = Image.open(io.BytesIO(encode(dec, dec.pixels, metadata=policy))).getexif()
    gps = out.get_ifd(ExifTags.IFD.GPSInfo)
    sub = out.get_ifd(ExifTags.IFD.Exif)
    if policy == "strip":
        assert len(out) == 0
    elif policy == "safe":
        assert out.get(ExifTags.Base.Make) == "Acme"
        assert not gps and ExifTags.Base.Artist not in out
        assert ExifTags.Base.BodySerialNumber not in sub and ExifTags.Base.ExposureTime in sub
    else:
        assert gps and out.get(ExifTags.Base.Artist) == "Jane Inspector"


def _exif_with_thumbnail(thumb: bytes) -> bytes:
    """Big-endian TIFF EXIF with IFD0 (Make) and IFD1 holding a JPEG thumbnail (Pillow cannot write IFD1)."""
    import struct

    make = b"Acme\x00"
    ifd0_off = 8
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x010F, 2, len(make), 0) + struct.pack(">I", 0)
    make_off = ifd0_off + len(ifd0)
    ifd1_off = make_off + len(make)
    thumb_off = ifd1_off + 2 + 2 * 12 + 4
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x010F, 2, len(make), make_off) + struct.pack(">I", ifd1_off)
    ifd1 = (struct.pack(">H", 2) + struct.pack(">HHII", 0x0201, 4, 1, thumb_off)
            + struct.pack(">HHII", 0x0202, 4, 1, len(thumb)) + struct.pack(">I", 0))
    return b"Exif\x00\x00" + b"MM\x00*" + struct.pack(">I", ifd0_off) + ifd0 + make + ifd1 + thumb


def test_exif_thumbnail_never_survives():
    """The EXIF thumbnail is an unmasked copy of the photo: it must be gone whatever the policy."""
    thumb = jpeg_bytes(np.full((16, 16, 3), 250, np.uint8))
    data = jpeg_bytes(np.full((40, 60, 3), 100, np.uint8), exif=_exif_with_thumbnail(thumb))
    assert data.count(b"\xff\xd8") == 2  # the photo and its thumbnail
    dec = decode(data)
    assert dec.exif.get(ExifTags.Base.Make) == "Acme"
    for policy in ("strip", "safe", "keep"):
        out = encode(dec, dec.pixels, metadata=policy)
        assert out.count(b"\xff\xd8") == 1, policy  # one JPEG start marker: no embedded thumbnail


def test_no_preview_of_the_photo_survives_keep_in_a_maker_note_or_photoshop_resource():
    """'keep' copied every EXIF value but IFD1's thumbnail: Nikon's maker note holds a preview JPEG of
    the photo (Olympus' and Pentax' too), Photoshop's image resources (0x8649) a thumbnail, an XMP
    packet a base64 JPEG: unmasked copies, published beside the masked photo. They go; the rest stays."""
    import base64
    import struct

    B = ExifTags.Base
    preview = jpeg_bytes(np.full((24, 32, 3), 250, np.uint8))
    exif = Image.Exif()
    exif.update({B.Make: "NIKON", B.Artist: "Jane Inspector",
                 0x8649: b"8BIM\x04\x0c\x00\x00" + struct.pack(">I", len(preview)) + preview,
                 B.XMLPacket: b"<x:xmpmeta><xmpGImg:image>" + base64.b64encode(preview) + b"</xmpGImg:image></x:xmpmeta>"})
    exif.get_ifd(ExifTags.IFD.Exif).update({
        B.ExposureTime: 0.01, B.MakerNote: b"Nikon\x00\x02\x10\x00\x00MM\x00*\x00\x00\x00\x08" + preview})
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(buf, format=fmt, exif=exif.tobytes())
        data = buf.getvalue()
        assert data.count(b"\xff\xd8\xff") == (3 if fmt == "JPEG" else 2) and base64.b64encode(preview) in data
        dec = decode(data)
        out = encode(dec, dec.pixels, metadata="keep")
        assert out.count(b"\xff\xd8\xff") == (1 if fmt == "JPEG" else 0), fmt  # the photo itself, nothing more
        assert b"/9j/" not in out, fmt
        kept = Image.open(io.BytesIO(out)).getexif()
        assert kept.get(B.Artist) == "Jane Inspector" and kept.get(B.Make) == "NIKON", fmt
        assert float(kept.get_ifd(ExifTags.IFD.Exif)[B.ExposureTime]) == 0.01, fmt


def test_photoshop_layers_and_raw_thumbnails_do_not_survive_keep():
    """A layered Photoshop TIFF keeps its layers' own pixels in tag 37724 (ImageSourceData) and may
    keep a raw-RGB thumbnail among its image resources (34377): no JPEG or PNG start to spot, so
    'keep' copied both, unmasked pixels of the photo, beside the masked one."""
    B = ExifTags.Base
    layers = b"Adobe Photoshop Document Data Block\x00" + bytes(range(256)) * 64  # raw layer pixels
    resources = b"8BIM\x04\x0c\x00\x00" + bytes(range(200, 256)) * 40  # a raw thumbnail resource
    exif = Image.Exif()
    exif.update({B.Artist: "Jane Inspector", 37724: layers, 34377: resources})
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(buf, format="TIFF", exif=exif.tobytes())
    data = buf.getvalue()
    assert layers[-256:] in data and resources[-56:] in data  # the input carries both
    dec = decode(data)
    out = encode(dec, dec.pixels, metadata="keep")
    assert layers[-256:] not in out and resources[-56:] not in out
    assert Image.open(io.BytesIO(out)).getexif().get(B.Artist) == "Jane Inspector"  # the rest is kept


def _exif_ifd0(entries) -> bytes:
    """EXIF whose IFD0 holds ``entries`` (tag, type, count, value bytes) as a buggy writer stores them
    (Pillow writes each tag as its own type, so it cannot make these)."""
    import struct

    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd, extra = struct.pack("<H", len(entries)), b""
    for tag, typ, count, value in sorted(entries):
        if len(value) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, count, data_at + len(extra))
            extra += value + b"\0" * (len(value) % 2)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra


@pytest.mark.parametrize("policy", ["safe", "keep"])
@pytest.mark.parametrize("bad", [
    (0x010F, 5, 1, b"\x01\0\0\0\x02\0\0\0"),  # Make as a RATIONAL
    (0x0128, 4, 1, b"\x70\x11\x01\0"),  # ResolutionUnit 70000 as a LONG (written as a SHORT)
    (0x011A, 2, 3, b"72\0"),  # XResolution as text
    (0x0106, 3, 2, b"\x02\0\x02\0"),  # PhotometricInterpretation of 2 values: Pillow refuses to read it (KeyError)
])
def test_an_exif_tag_pillow_cannot_write_back_is_dropped_not_the_photo(policy, bad):
    """A tag stored with a type Pillow cannot write back (or read: any tag, allow-listed or not) made
    encode raise: the photo failed as a write_error ('cannot mask or write ...: TypeError'), on every
    run, never published. The tag goes; the photo and the rest of its EXIF are written."""
    exif = _exif_ifd0([bad, (0x0110, 2, 8, b"Phone 9\0"), (0x0132, 2, 20, b"2026:11:20 10:11:12\0")])
    rgb = np.random.default_rng(4).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    dec = decode(jpeg_bytes(rgb, exif=exif))
    assert bad[0] in dec.exif
    out = Image.open(io.BytesIO(encode(dec, dec.pixels, metadata=policy)))
    assert out.size == (60, 40)
    written = out.getexif()
    assert bad[0] not in written
    assert written.get(ExifTags.Base.Model) == "Phone 9" and written.get(ExifTags.Base.DateTime) == "2026:11:20 10:11:12"
    assert written.get(ExifTags.Base.Orientation) == 1


@pytest.mark.parametrize("kind", ["turned", "CMYK", "P", "F", "LAB", "I"])
def test_a_tiff_kept_with_keep_is_a_readable_copy_of_the_masked_pixels(kind):
    """A TIFF's EXIF is its own first directory: 'keep' copied its layout tags (width, samples,
    colour model, palette, sample format) and Pillow's TIFF writer took them over its own. A TIFF
    turned by its orientation was written with the original's width (rows sheared); a CMYK, palette
    or float one as a file no reader opens; a LAB one was labelled LAB over RGB pixels. Each record
    said masked. The layout comes from the masked pixels; the rest of the EXIF stays."""
    rgb = np.random.default_rng(5).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    img = {"turned": Image.fromarray(rgb), "CMYK": Image.fromarray(rgb).convert("CMYK"),
           "P": Image.fromarray(rgb).convert("P"), "F": Image.fromarray(rgb[..., 0].astype(np.float32)),
           "LAB": Image.fromarray(rgb).convert("LAB"), "I": Image.fromarray(rgb[..., 0].astype(np.int32) * 200)}[kind]
    tags = {ExifTags.Base.Artist: "Jane Inspector", **({ExifTags.Base.Orientation: 6} if kind == "turned" else {})}
    buf = io.BytesIO()
    img.save(buf, format="TIFF", tiffinfo=tags)
    dec = decode(buf.getvalue())
    out = Image.open(io.BytesIO(encode(dec, dec.pixels, metadata="keep")))
    assert out.size == (dec.width, dec.height) and out.mode == dec.mode
    assert np.array_equal(np.asarray(out), dec.pixels)
    assert out.getexif().get(ExifTags.Base.Artist) == "Jane Inspector"


XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:exif="http://ns.adobe.com/exif/1.0/" '
       b'exif:GPSLatitude="52,31.5N" exif:GPSLongitude="13,24.2E"><dc:creator>Jane Inspector</dc:creator>'
       b'</rdf:Description></rdf:RDF></x:xmpmeta>')
IPTC = b"\x1c\x02\x50\x00\x0eJane Inspector\x1c\x02\x5a\x00\x06Berlin"
PERSONAL = [b"Jane Inspector", b"52,31.5N", b"Berlin", b"SN-777", b"LENS-42", b"Fleet car 17", b"owner Max",
            b"workstation-9", b"maker-secret", b"uid-0042"]


def _personal_exif() -> Image.Exif:
    """Everything a phone or a DAM may put in EXIF, personal or not."""
    B = ExifTags.Base
    exif = Image.Exif()
    exif.update({B.Make: "Acme", B.Model: "Phone 9", B.DateTime: "2026:11:20 10:11:12", B.Orientation: 1,
                 B.XMLPacket: XMP, 0x83BB: IPTC, B.CameraSerialNumber: "SN-777", B.DocumentName: "Fleet car 17",
                 B.HostComputer: "workstation-9", B.Artist: "Jane Inspector", B.Copyright: "owner Max"})
    exif.get_ifd(ExifTags.IFD.Exif).update({
        B.ExposureTime: 0.01, B.FNumber: 2.8, B.ISOSpeedRatings: 200, B.DateTimeOriginal: "2026:11:20 10:11:12",
        B.ColorSpace: 1, B.BodySerialNumber: "SN-777", B.LensSerialNumber: "LENS-42", B.CameraOwnerName: "owner Max",
        B.MakerNote: b"maker-secret", B.UserComment: b"ASCII\x00\x00\x00Jane Inspector", B.ImageUniqueID: "uid-0042"})
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({1: "N", 2: (52.0, 31.0, 30.0), 3: "E", 4: (13.0, 24.0, 12.0)})
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_safe_metadata_keeps_only_the_allow_list(fmt):
    """Issue 12: GPS and the creator survived 'safe' inside EXIF's XMP tag (0x02BC), as did IPTC-NAA (0x83BB),
    CameraSerialNumber and DocumentName, in JPEG and WebP."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    extra = {"xmp": XMP, "comment": b"Jane Inspector"} if fmt == "JPEG" else {"xmp": XMP}
    Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(buf, format=fmt, exif=_personal_exif().tobytes(),
                                                              icc_profile=icc, **extra)
    data = buf.getvalue()
    assert all(p in data for p in PERSONAL)  # the input carries them all
    dec = decode(data)
    out_bytes = encode(dec, dec.pixels, metadata="safe")
    for p in PERSONAL:
        assert p not in out_bytes, p
    out = Image.open(io.BytesIO(out_bytes))
    assert out.format == fmt and "xmp" not in out.info and "comment" not in out.info
    exif = out.getexif()
    B = ExifTags.Base
    assert dict(exif) == {B.Make: "Acme", B.Model: "Phone 9", B.DateTime: "2026:11:20 10:11:12", B.Orientation: 1,
                          ExifTags.IFD.Exif: exif[ExifTags.IFD.Exif]}
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    assert set(sub) == {B.ExposureTime, B.FNumber, B.ISOSpeedRatings, B.DateTimeOriginal, B.ColorSpace}
    assert float(sub[B.ExposureTime]) == 0.01 and sub[B.ISOSpeedRatings] == 200
    assert not exif.get_ifd(ExifTags.IFD.GPSInfo)
    assert out.info.get("icc_profile") == icc
    # 'keep' is the explicit opt-in that keeps EXIF as it was (but the thumbnail)
    kept = Image.open(io.BytesIO(encode(dec, dec.pixels, metadata="keep"))).getexif()
    assert kept.get(B.CameraSerialNumber) == "SN-777" and kept.get_ifd(ExifTags.IFD.GPSInfo)


def _frames(n, size=(60, 40)):
    return [Image.new("RGB", size, (40 * i, 100, 200 - 40 * i)) for i in range(n)]


def _save_all(fmt, frames, **kw) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **kw)
    return buf.getvalue()


def test_mpo_from_phones_is_read_as_its_first_frame():
    """Issue 12: JPEGs with an MP extension (Pillow: 'MPO') failed as unsupported_format."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Acme"
    data = _save_all("MPO", _frames(3), exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).format == "MPO"
    dec = decode(data)
    assert dec.format == "JPEG" and dec.frames_dropped == 2 and (dec.width, dec.height) == (60, 40)
    assert np.abs(dec.rgb[20, 30].astype(int) - (0, 100, 200)).max() < 8  # the first frame
    out = encode(dec, dec.pixels)
    back = Image.open(io.BytesIO(out))
    assert back.format == "JPEG" and getattr(back, "n_frames", 1) == 1 and out.count(b"\xff\xd8") == 1
    assert back.getexif().get(ExifTags.Base.Make) == "Acme"


@pytest.mark.parametrize("fmt,kw", [("TIFF", {}), ("WEBP", {"duration": 100}), ("PNG", {"duration": 100})])
def test_multi_page_files_are_refused_not_cut(fmt, kw):
    """Issue 12: only page 1 of a multi-page TIFF was written, silently. Animated WebP/PNG alike."""
    data = _save_all(fmt, _frames(3), **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    with pytest.raises(ImageError) as e:
        decode(data)
    assert e.value.reason == "multi_page_unsupported" and "3 pages" in str(e.value) and "split" in str(e.value)
    assert decode(_save_all(fmt, _frames(1), **kw)).frames_dropped == 0  # a single page is fine


def test_max_pixels_can_be_raised_past_pillows_own_guard():
    """Issue 12: '--max-pixels' above ~89.5 MP changed nothing: Pillow's MAX_IMAGE_PIXELS refused first."""
    from platemask.imageio import DEFAULT_MAX_PIXELS, MAX_PIXELS_CEILING

    side = 9500  # 90.25 MP: above Pillow's default guard (89.5 MP) and our default limit
    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, format="PNG")
    data = buf.getvalue()
    with pytest.raises(ImageError) as e:
        decode(data)
    assert e.value.reason == "too_large" and f"{DEFAULT_MAX_PIXELS:,}" in str(e.value) and "--max-pixels" in str(e.value)
    dec = decode(data, max_pixels=100_000_000)
    assert (dec.width, dec.height) == (side, side)
    with pytest.raises(ValueError, match="max_pixels"):
        decode(data, max_pixels=MAX_PIXELS_CEILING + 1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("strip_bytes", [1 << 30, 500])
def test_pixels_come_out_of_pillow_whole_or_in_strips_the_same(mode, strip_bytes, monkeypatch):
    """Small photos are copied out of Pillow at once, large ones in strips of rows (memory): both give
    ``np.array(img)`` exactly, as a writable array (masking writes into it)."""
    import platemask.imageio as imageio

    monkeypatch.setattr(imageio, "BAND_BYTES", strip_bytes)
    a = np.random.default_rng(2).integers(0, 255, (37, 53, len(mode)), dtype=np.uint8)
    img = Image.fromarray(a[..., 0] if mode == "L" else a, mode)
    got = imageio._array(img)
    assert got.flags.writeable and np.array_equal(got, np.array(img))


def test_the_decoder_gets_a_photos_bytes_in_one_read(monkeypatch):
    """Pillow reads 64 KB at a time by default, and every read hands the interpreter lock over and
    waits to get it back (milliseconds beside the detector's Python: bench/bench_gil.py): a photo's
    encoded bytes go to the decoder in one read. Same pixels either way."""
    import io as _io

    rng = np.random.default_rng(3)
    data = jpeg_bytes(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8), quality=95)
    assert len(data) > 4 * 65536
    reads = []

    class CountingBytesIO(_io.BytesIO):
        def read(self, n=-1):
            out = super().read(n)
            reads.append(len(out))
            return out

    monkeypatch.setattr(_io, "BytesIO", CountingBytesIO)
    dec = decode(data)
    monkeypatch.undo()
    assert sum(r >= 65536 for r in reads) == 1, reads
    assert np.array_equal(dec.pixels, np.asarray(Image.open(_io.BytesIO(data)).convert("RGB")))


def test_a_profile_that_does_not_describe_the_written_pixels_is_left_out():
    """A CMYK photo is written back as RGB (converted without colour management), but its CMYK ICC
    profile was copied over: colour-managed viewers read the RGB pixels as CMYK (wrong colours, or
    the photo refused). A profile is kept only when its colour space is the output's."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    as_space = lambda space: srgb[:16] + space + srgb[20:]  # noqa: E731 - the header's colour space field
    cases = [("CMYK", np.full((40, 60, 4), 60, np.uint8), b"CMYK", None),
             ("RGB", np.full((40, 60, 3), 60, np.uint8), b"RGB ", "kept"),
             ("L", np.full((40, 60), 60, np.uint8), b"GRAY", "kept"),
             ("L", np.full((40, 60), 60, np.uint8), b"RGB ", None)]
    for mode, pixels, space, expect in cases:
        buf = io.BytesIO()
        Image.fromarray(pixels, mode).save(buf, format="JPEG", icc_profile=as_space(space))
        dec = decode(buf.getvalue())
        assert dec.icc_profile == as_space(space)  # read from the original
        out = Image.open(io.BytesIO(encode(dec, dec.pixels)))
        got = out.info.get("icc_profile")
        assert (got == as_space(space)) if expect else got is None, (mode, space, out.mode)


def _grey_plate() -> np.ndarray:
    """A grey 8-bit picture of a plate (dark characters on a light plate, on a mid-grey car)."""
    from platemask.training.synth import render_plate

    a = np.full((120, 360), 90, np.uint8)
    plate, _ = render_plate(np.random.default_rng(3), text="AB 123 CD", height=64)
    a[28:28 + plate.shape[0], 40:40 + plate.shape[1]] = np.asarray(Image.fromarray(plate).convert("L"))
    return a


def _tiff_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("hot_pixel", [False, True])
def test_a_16bit_grey_photo_holding_8bit_values_is_seen_by_the_detector_as_its_levels_show_it(hot_pixel):
    """A 16-bit grey PNG holding 0..255 (``arr.astype(np.uint16)``): the detector's view was its
    high byte, all black; the real model recorded no_plate and the photo was published with its plate
    readable (OCR read it exactly once its levels were stretched). The view now follows its levels."""
    g = _grey_plate()
    a = g.astype(np.uint16)
    if hot_pixel:
        a[0, 0] = 65535  # one stuck pixel does not set the levels
    dec = decode(png_bytes(a))
    assert dec.mode == "I;16" and np.array_equal(dec.pixels, a)  # written back as stored
    view = dec.rgb[..., 0].astype(int)
    assert view[1:].max() - view[1:].min() > 200
    assert np.corrcoef(view[1:].ravel(), g[1:].ravel())[0, 1] > 0.99
    g[0, :300], g[1, :300] = 0, 255
    full = decode(png_bytes((g.astype(np.uint16) * 257)))  # a full-range 16-bit photo is seen as stored
    assert np.array_equal(full.rgb[..., 0], g)


def test_float_and_32bit_tiffs_are_written_and_seen_with_their_levels_not_clipped():
    """A float TIFF stores 0..1 (as viewers show it): Pillow's conversion clipped at 0..255, so it
    was detected as a black photo (no_plate) and published all black. A 32-bit integer TIFF above
    65535 was clipped white. Both are now 16-bit grey with every level kept, seen as they show."""
    g = _grey_plate()
    dec = decode(_tiff_bytes(Image.fromarray((g / 255.0).astype(np.float32), "F")))
    assert dec.mode == "I;16" and np.abs(dec.pixels.astype(int) - g.astype(int) * 257).max() <= 1
    assert np.abs(dec.rgb[..., 0].astype(int) - g).max() <= 2
    back = Image.open(io.BytesIO(encode(dec, dec.pixels)))
    assert back.format == "TIFF" and np.array_equal(np.asarray(back).astype(np.uint16), dec.pixels)
    big = decode(_tiff_bytes(Image.fromarray(g.astype(np.int32) * 4000 - 50_000, "I")))
    assert big.mode == "I;16" and len(np.unique(big.pixels)) == len(np.unique(g))  # no level clipped away
    assert np.corrcoef(big.rgb[..., 0].ravel().astype(float), g.ravel())[0, 1] > 0.99
    nan = (g / 255.0).astype(np.float32)
    nan[0, :5] = np.nan
    assert decode(_tiff_bytes(Image.fromarray(nan, "F"))).pixels[0, :5].tolist() == [0] * 5


def _tiff_tag_set(data: bytes, tag: int, value: int) -> bytes:
    """``data`` (a TIFF) with IFD0's SHORT ``tag`` set to ``value``."""
    import struct

    b = bytearray(data)
    bo = "<" if b[:2] == b"II" else ">"
    ifd = struct.unpack(bo + "I", b[4:8])[0]
    for i in range(struct.unpack(bo + "H", b[ifd:ifd + 2])[0]):
        e = ifd + 2 + 12 * i
        if struct.unpack(bo + "H", b[e:e + 2])[0] == tag:
            b[e + 8:e + 10] = struct.pack(bo + "H", value)
            return bytes(b)
    raise KeyError(tag)


@pytest.mark.parametrize("kind", ["L", "I;16", "F"])
def test_a_deep_grey_tiff_storing_white_as_zero_is_read_and_written_as_it_shows(kind):
    """PhotometricInterpretation 0 (WhiteIsZero): Pillow inverts an 8-bit TIFF, not a 16-bit or
    float one, so the detector saw the photo's negative and the masked copy was published as one."""
    g = _grey_plate()
    stored = {"L": Image.fromarray(255 - g), "I;16": Image.fromarray((255 - g).astype(np.uint16) * 257),
              "F": Image.fromarray(((255 - g) / 255.0).astype(np.float32), "F")}[kind]
    dec = decode(_tiff_tag_set(_tiff_bytes(stored), 262, 0))
    assert np.abs(dec.rgb[..., 0].astype(int) - g).max() <= 2  # seen as it shows: white plate, dark characters
    back = np.asarray(Image.open(io.BytesIO(encode(dec, dec.pixels)))).astype(np.float64)
    assert np.corrcoef(back.ravel(), g.ravel())[0, 1] > 0.99  # written as it shows, not as a negative


def _rgb16(rgb16: np.ndarray, ext: str, orientation: int = 1) -> bytes:
    """A 16-bit RGB(A) ``ext`` file of ``rgb16`` (OpenCV writes them; Pillow cannot), EXIF orientation
    added as a PNG eXIf chunk or a TIFF tag."""
    import cv2

    order = cv2.COLOR_RGBA2BGRA if rgb16.shape[2] == 4 else cv2.COLOR_RGB2BGR
    params = [cv2.IMWRITE_TIFF_COMPRESSION, 1] if ext == ".tif" else []
    data = cv2.imencode(ext, cv2.cvtColor(rgb16, order), params)[1].tobytes()
    if orientation == 1:
        return data
    if ext == ".tif":
        import struct
        b = bytearray(data)
        ifd = struct.unpack("<I", b[4:8])[0]
        n = struct.unpack("<H", b[ifd:ifd + 2])[0]
        # append an Orientation entry: rewrite IFD0 at the end with n + 1 entries (tags stay sorted: 274 is
        # placed before the first tag above it)
        entries = [bytes(b[ifd + 2 + 12 * i: ifd + 14 + 12 * i]) for i in range(n)]
        entries.append(struct.pack("<HHIHH", 274, 3, 1, orientation, 0))
        entries.sort(key=lambda e: struct.unpack("<H", e[:2])[0])
        new = len(b) + (len(b) & 1)
        b += b"\0" * (new - len(b)) + struct.pack("<H", n + 1) + b"".join(entries) + struct.pack("<I", 0)
        b[4:8] = struct.pack("<I", new)
        return bytes(b)
    ex = Image.Exif()
    ex[ExifTags.Base.Orientation] = orientation
    chunk = b"eXIf" + ex.tobytes()[6:]  # without the JPEG 'Exif\0\0' header
    import zlib
    import struct
    end = data.index(b"IDAT") - 4
    return data[:end] + struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[end:]


@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("alpha", [False, True])
@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_a_16bit_colour_photo_holding_8bit_values_is_seen_and_written_as_it_shows(ext, alpha, orientation):
    """Pillow reads a 16-bit RGB(A) PNG or TIFF as its high bytes: one holding 8-bit values was all
    black, detected as no plate and published as a black copy recorded as checked. Its colour is now
    read at full depth and reduced by its levels; orientation, alpha and full-range photos as before."""
    g = _grey_plate()
    rgb = np.stack([g, np.roll(g, 3, axis=1), 255 - g], axis=2)
    if alpha:
        rgb = np.concatenate([rgb, np.full(g.shape + (1,), 255, np.uint8)], axis=2)
        rgb[:10, :10, 3] = 0
    low = rgb.astype(np.uint16)
    low[..., 3:] *= 257  # the alpha uses the full range; the colour holds 0..255
    data = _rgb16(low, ext, orientation)
    want = Image.fromarray(rgb)
    if orientation != 1:
        want = want.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270}[orientation])
    want = np.asarray(want)
    dec = decode(data)
    assert dec.mode == ("RGBA" if alpha else "RGB") and dec.pixels.shape == want.shape
    colour = dec.pixels[..., :3].astype(float)
    assert colour.max() - colour.min() > 200  # its levels, not black
    assert np.corrcoef(colour.ravel(), want[..., :3].ravel())[0, 1] > 0.99  # the photo, upright
    assert np.array_equal(dec.pixels[..., 3:], want[..., 3:])  # alpha as stored
    back = np.asarray(Image.open(io.BytesIO(encode(dec, dec.pixels))))
    assert np.array_equal(back, dec.pixels)
    full = decode(_rgb16(rgb.astype(np.uint16) * 257, ext, orientation))  # a full-range one: its high bytes
    assert np.array_equal(full.pixels, want)
    dim = rgb.astype(np.uint16) * 80  # a dim 16-bit photo (up to 20,400): written as Pillow reads it, its look kept
    dim[..., 3:] = 65535
    assert np.array_equal(decode(_rgb16(dim, ext, orientation)).pixels[..., :3], (want[..., :3].astype(np.uint16) * 80) >> 8)


def test_a_small_plate_in_a_dark_16bit_photo_keeps_its_contrast_in_the_detectors_view():
    """A night photo in a 16-bit grey file holding 8-bit values: mostly black, a small lit plate (under
    0.1 % of the pixels) and two stuck pixels. Levels from percentiles put the plate above the
    brightest level: characters and plate both white in the detector's view."""
    a = np.zeros((1000, 1500), np.uint16)
    a[500:530, 700:740] = 240  # the lit plate: 1,200 pixels, 0.08 %
    a[505:525, 705:735:6] = 30  # its characters
    a[3, 3] = a[900, 1400] = 65535
    view = decode(png_bytes(a)).rgb[..., 0].astype(int)
    plate, chars = view[500:530, 700:740], view[505:525, 705:735:6]
    assert plate.max() - chars.max() > 150


@pytest.mark.parametrize("kind", ["jpeg_after_eoi", "png_after_iend", "mpo"])
@pytest.mark.parametrize("metadata", ["safe", "keep"])
def test_no_hidden_second_image_of_the_input_reaches_the_output(kind, metadata):
    """A second, unmasked copy of the photo carried beside the one viewers show (a JPEG appended after
    EOI, an uncropped original left after a PNG's IEND as aCropalypse left it, an MPO's second frame)
    never reaches the output: it is a fresh encode of the first image's masked pixels."""
    rng = np.random.default_rng(1)
    shown = rng.integers(0, 255, (40, 60, 3), np.uint8)
    hidden = np.full((80, 120, 3), (10, 200, 30), np.uint8)
    tag = b"UNMASKED-ORIGINAL-0123456789"
    hidden_jpeg = jpeg_bytes(hidden, comment=tag)
    if kind == "jpeg_after_eoi":
        data = jpeg_bytes(shown) + hidden_jpeg
    elif kind == "png_after_iend":
        data = png_bytes(shown) + png_bytes(hidden) + tag
    else:
        buf = io.BytesIO()
        Image.fromarray(shown).save(buf, format="MPO", save_all=True, append_images=[Image.fromarray(hidden)])
        data = buf.getvalue()
    dec = decode(data)
    assert (dec.width, dec.height) == (60, 40)
    out = encode(dec, dec.pixels, metadata=metadata)
    assert tag not in out and hidden_jpeg[20:200] not in out
    assert out.count(b"\xff\xd8\xff") <= 1 and out.count(b"\x89PNG") <= 1
    back = Image.open(io.BytesIO(out))
    assert getattr(back, "n_frames", 1) == 1 and back.size == (60, 40)


def _raw_profile_exif(exif: Image.Exif) -> str:
    """EXIF as ImageMagick keeps it in a PNG: a text chunk 'Raw profile type exif' of hex lines."""
    b = b"Exif\x00\x00" + exif.tobytes()
    hx = b.hex()
    return "\nexif\n" + f"{len(b):8d}\n" + "\n".join(hx[i:i + 72] for i in range(0, len(hx), 72)) + "\n"


@pytest.mark.parametrize("orientation", [3, 6])
@pytest.mark.parametrize("zipped", [False, True])
def test_a_png_orientation_in_a_text_chunk_does_not_turn_the_photo(orientation, zipped):
    """ImageMagick keeps EXIF in a PNG as a text chunk 'Raw profile type exif'. Pillow's getexif reads
    it, browsers do not: a photo they show upright with a stale Orientation there was turned, detected
    upside down (a real held-out photo: plate scored 0.82 upright, missed turned: no_plate) and
    published turned. It is read as stored; an eXIf chunk's Orientation still turns the photo."""
    from PIL import PngImagePlugin

    raw = _raw_with_marker()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "Acme"
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", _raw_profile_exif(exif), zip=zipped)
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="PNG", pnginfo=info)
    dec = decode(buf.getvalue())
    assert dec.orientation == 1 and (dec.width, dec.height) == (W, H)
    ys, xs = np.nonzero(dec.rgb[..., 0] > 200)
    assert abs(xs.mean() - 10) <= 1 and abs(ys.mean() - 5) <= 1
    out = Image.open(io.BytesIO(encode(dec, dec.pixels)))
    assert out.size == (W, H) and out.getexif().get(ExifTags.Base.Orientation, 1) == 1
    buf = io.BytesIO()  # the same EXIF in an eXIf chunk, which browsers apply: turned as before
    Image.fromarray(raw).save(buf, format="PNG", exif=exif.tobytes())
    x, y, w, h = _expected_position(orientation)
    dec = decode(buf.getvalue())
    assert (dec.width, dec.height) == (w, h) and dec.rgb[y, x, 0] > 200


@pytest.mark.parametrize("orientation", [3, 6])
def test_a_png_exif_chunk_after_the_pixels_does_not_turn_the_photo(orientation):
    """Browsers ignore an eXIf chunk after IDAT (CSS Images 3: UAs ignore EXIF that comes after the image
    data; PNG's 3rd edition puts eXIf first; ExifTool appends it by default), Pillow read it as the
    pixels loaded: a photo shown upright with a stale Orientation there was turned before detection."""
    raw = _raw_with_marker()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = png_bytes(raw)
    body = exif.tobytes().removeprefix(b"Exif\x00\x00")  # an eXIf chunk holds the TIFF structure alone
    late = data[:-12] + _png_chunk(b"eXIf", body) + data[-12:]  # just before IEND
    dec = decode(late)
    assert dec.orientation == 1 and (dec.width, dec.height) == (W, H)
    ys, xs = np.nonzero(dec.rgb[..., 0] > 200)
    assert abs(xs.mean() - 10) <= 1 and abs(ys.mean() - 5) <= 1
    at = data.index(b"IDAT") - 4  # the same chunk before the pixels: applied, as browsers do
    x, y, w, h = _expected_position(orientation)
    dec = decode(data[:at] + _png_chunk(b"eXIf", body) + data[at:])
    assert (dec.width, dec.height) == (w, h) and dec.rgb[y, x, 0] > 200


def _striped(mode: str) -> bytes:
    """A 120 x 200 file of ``mode`` whose rows 40..80, columns 50..150 hold fine stripes (the 'plate')."""
    g = np.full((120, 200), 120, np.uint8)
    g[40:80:2, 50:150] = 230
    g[41:80:2, 50:150] = 20
    rgb = np.stack([g, g // 2 + 60, 255 - g], axis=2)
    if mode == "RGB16":
        return _rgb16(rgb.astype(np.uint16), ".png")  # 8-bit values in a 16-bit file
    if mode == "I;16":
        return png_bytes(g.astype(np.uint16) * 257)
    if mode == "F":
        return _tiff_bytes(Image.fromarray((g / 255.0).astype(np.float32), "F"))
    img = Image.fromarray(rgb).convert(mode) if mode not in ("L", "LA", "1") else Image.fromarray(g).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format={"CMYK": "JPEG", "YCbCr": "TIFF"}.get(mode, "PNG"), quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr", "I;16", "F", "RGB16"])
@pytest.mark.parametrize("style", ["gaussian", "pixelate", "solid"])
def test_the_mask_is_as_strong_in_every_pixel_format_once_written(mode, style):
    """Decoded, masked, encoded and read back, the stripes under the plate are gone in every pixel
    format (every bit of a 16-bit one, every channel), and were there in the view the detector saw."""
    from platemask.detections import Plate
    from platemask.geometry import box_polygon
    from platemask.mask import MaskStyle, apply_mask

    dec = decode(_striped(mode))
    seen = dec.rgb[40:80, 50:150].astype(int)
    assert np.abs(np.diff(seen, axis=0)).mean() > 40  # the detector saw the stripes
    masked = apply_mask(dec.pixels, [Plate(0.9, box_polygon([50, 40, 150, 80]))], MaskStyle(mode=style))
    back = np.asarray(Image.open(io.BytesIO(encode(dec, masked)))).astype(np.int64)
    scale = 257 if back.dtype == np.uint16 or back.max() > 255 else 1
    core = back[42:78, 52:148] / scale
    assert np.abs(np.diff(core, axis=0)).max() < 12, f"{mode}/{style}: stripes survive under the mask"


@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_a_webp_with_an_exif_orientation_fails_naming_it_not_masked_turned(orientation):
    """Browsers show a WebP as stored, ignoring its EXIF Orientation (Chromium 156: a WebP with
    Orientation 3 or 6 shows untouched), while decode turned it as Pillow does: a real held-out photo
    shown upright with a stale Orientation 3 or 6 was detected turned (plate 0.98 upright, none
    turned), recorded no_plate and published turned, unmasked. Which way its plates read cannot be
    told from the file, so it fails with what to do; a WebP with Orientation 1 or none, and a JPEG's
    Orientation (which browsers apply), are read as before."""
    raw = _raw_with_marker()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "Acme"
    for lossless in (False, True):
        buf = io.BytesIO()
        Image.fromarray(raw).save(buf, format="WEBP", exif=exif.tobytes(), lossless=lossless, quality=95)
        with pytest.raises(ImageError) as e:
            decode(buf.getvalue())
        assert e.value.reason == "ambiguous_orientation"
        assert f"Orientation {orientation}" in str(e.value) and "-auto-orient" in str(e.value)
    exif[ExifTags.Base.Orientation] = 1
    for kw in ({"exif": exif.tobytes()}, {}):
        buf = io.BytesIO()
        Image.fromarray(raw).save(buf, format="WEBP", lossless=True, **kw)
        dec = decode(buf.getvalue())
        assert dec.orientation == 1 and (dec.width, dec.height) == (W, H) and dec.rgb[5, 10, 0] > 200
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    x, y, w, h = _expected_position(orientation)
    dec = decode(buf.getvalue())
    assert (dec.width, dec.height) == (w, h) and dec.rgb[y, x, 0] > 200


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_plate_in_the_deep_shadows_of_a_16bit_grey_photo_is_seen_by_the_detector(fmt):
    """16-bit grey is written at 16 bits. A full-range photo whose plate lies 8 stops down (values
    under 256) was seen by its high byte, plate black: a real held-out photo made so was recorded
    with its plate unfound and published with it readable once brightened (any 16-bit tool's
    exposure). The detector also looks at its shadows lifted (a log curve), where the stripes of
    the plate keep their contrast; the memory reserved counts that view."""
    from platemask.imageio import decoded_nbytes

    a = np.full((120, 200), 40000, np.uint16)
    a[:30] = 65535  # sky
    a[30:100, 30:170] = 120  # the car's shadowed front
    a[40:80:2, 50:150] = 230  # the plate's stripes, 8 stops down
    a[41:80:2, 50:150] = 20
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    data = buf.getvalue()
    dec = decode(data)
    assert dec.mode == "I;16" and dec.rgb[40:80, 50:150].max() == 0  # the view: black as it was
    contrast = [np.abs(np.diff(v[40:80, 50:150, 0].astype(int), axis=0)).mean() for v in dec.detector_views]
    assert max(contrast) > 40, contrast
    assert decoded_nbytes(data) >= dec.pixels.nbytes + sum(v.nbytes for v in dec.detector_views)
    out = Image.open(io.BytesIO(encode(dec, dec.pixels)))
    assert np.array_equal(np.asarray(out), a)  # written at 16 bits, as before
    narrow = (a // 32).astype(np.uint16)  # content within 12 bits: its view keeps it, no third view
    buf = io.BytesIO()
    Image.fromarray(narrow).save(buf, format=fmt)
    assert decode(buf.getvalue()).shadows_rgb is None


@pytest.mark.parametrize("orientation", [3, 6])
def test_an_exif_browsers_cannot_read_for_a_doubled_header_does_not_turn_the_photo(orientation):
    """Code that adds "Exif\\0\\0" to Pillow's Exif.tobytes() (which has it) writes it twice: in a JPEG's
    APP1, and in a PNG's eXIf (which holds the TIFF structure alone). Pillow skips the extra header,
    browsers read no EXIF there (Chromium 156 shows such a photo as stored): a real held-out photo
    shown upright with Orientation 3 so written was turned before detection, its plate missed
    (no_plate), and published turned and unmasked. It is read as stored; the well-formed EXIF
    still turns the photo."""
    import struct

    raw = _raw_with_marker()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "Acme"
    app1 = exif.tobytes()
    assert app1.startswith(b"Exif\x00\x00")
    jpeg = io.BytesIO()
    Image.fromarray(raw).save(jpeg, format="JPEG", quality=95)
    jpeg = jpeg.getvalue()
    png = png_bytes(raw)
    at = png.index(b"IDAT") - 4

    def in_jpeg(body: bytes) -> bytes:
        return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]

    def in_png(body: bytes) -> bytes:
        return png[:at] + _png_chunk(b"eXIf", body) + png[at:]

    for data in (in_jpeg(b"Exif\x00\x00" + app1), in_png(app1)):
        assert Image.open(io.BytesIO(data)).getexif().get(ExifTags.Base.Orientation) == orientation  # Pillow's reading
        dec = decode(data)
        assert dec.orientation == 1 and (dec.width, dec.height) == (W, H)
        ys, xs = np.nonzero(dec.rgb[..., 0] > 200)
        assert abs(xs.mean() - 10) <= 1 and abs(ys.mean() - 5) <= 1
        out = Image.open(io.BytesIO(encode(dec, dec.pixels)))
        assert out.size == (W, H) and out.getexif().get(ExifTags.Base.Orientation, 1) == 1
    x, y, w, h = _expected_position(orientation)
    for data in (in_jpeg(app1), in_png(app1[6:])):  # as the formats put it: turned, as browsers do
        dec = decode(data)
        assert dec.orientation == orientation and (dec.width, dec.height) == (w, h) and dec.rgb[y, x, 0] > 200


@pytest.mark.parametrize("typ,count,value4", [
    (4, 1, b"\x03\0\0\0"),  # LONG
    (8, 1, b"\x03\0\0\0"),  # SSHORT
    (9, 1, b"\x03\0\0\0"),  # SLONG
    (3, 2, b"\x03\0\x01\0"),  # two SHORTs, the first 3
], ids=["long", "sshort", "slong", "two_shorts"])
def test_an_orientation_browsers_ignore_for_its_type_does_not_turn_the_photo(typ, count, value4):
    """EXIF's Orientation is a SHORT of count 1. Browsers ignore one stored otherwise (Chromium 156
    shows such a JPEG or PNG as stored), Pillow reads a LONG, SSHORT or SLONG, or the first of several
    SHORTs: a real held-out photo shown upright with Orientation 3 written as a LONG was turned before
    detection, recorded no_plate and published turned and unmasked. It is read as stored; a SHORT
    still turns the photo."""
    import struct

    data = exif_orientation_jpeg(typ, count, value4)
    assert Image.open(io.BytesIO(data)).getexif().get(ExifTags.Base.Orientation) in (3, (3, 1))  # Pillow's reading
    dec = decode(data)
    assert dec.orientation == 1 and np.array_equal(dec.rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    tiff = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 274, typ, count) + value4 + struct.pack("<I", 0)
    png = png_bytes(_raw_with_marker())
    at = png.index(b"IDAT") - 4
    dec = decode(png[:at] + _png_chunk(b"eXIf", tiff) + png[at:])
    assert dec.orientation == 1 and dec.rgb[5, 10, 0] > 200
    short = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 274, 3, 1) + b"\x03\0\0\0" + struct.pack("<I", 0)
    x, y, w, h = _expected_position(3)
    dec = decode(png[:at] + _png_chunk(b"eXIf", short) + png[at:])
    assert dec.orientation == 3 and (dec.width, dec.height) == (w, h) and dec.rgb[y, x, 0] > 200
    assert decode(exif_orientation_jpeg(3, 1, b"\x03\0\0\0")).orientation == 3
