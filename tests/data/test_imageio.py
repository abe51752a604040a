"""Header probing: the fast JPEG/PNG header reader agrees with PIL; truncation is seen without decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kontext_data.imageio import IMAGE_EXTENSIONS, fast_header, is_image_name, open_rgb, probe_bytes
from pairkit import image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pil_header(data: bytes):
    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size[0], im.size[1], int(im.getexif().get(0x0112, 1))


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    e[0x010F] = "camera maker"  # another tag before/after, so the reader has to walk the IFD
    return e.tobytes()


VARIANTS = [
    ("JPEG", dict()),
    ("JPEG", dict(progressive=True)),
    ("JPEG", dict(quality=20, subsampling=2)),
    ("JPEG-CMYK", dict()),
    ("JPEG-L", dict()),
    *[("JPEG", dict(exif=exif(o))) for o in range(1, 9)],
    ("PNG", dict()),
    ("PNG-L", dict()),
    ("PNG-P", dict(transparency=0)),
    ("PNG-16", dict()),
]


@pytest.mark.parametrize("fmt,kw", VARIANTS)
def test_fast_header_agrees_with_pil(fmt, kw):
    base = image((75, 41), 1)
    kind, _, mode = fmt.partition("-")
    img = {"CMYK": base.convert("CMYK"), "L": base.convert("L"), "P": base.convert("P"),
           "16": Image.fromarray(np.full((41, 75), 4000, np.uint16)).convert("I;16"), "": base}[mode]
    data = encode(img, kind, **kw)
    assert fast_header(data) == pil_header(data)


def test_exif_after_an_xmp_segment_and_big_endian():
    jpeg = encode(image((30, 20)), "JPEG")
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    app1_xmp = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
    # a big-endian TIFF block with orientation 6
    tiff = b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + \
        (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big") + (6).to_bytes(2, "big") + b"\x00\x00" + \
        (0).to_bytes(4, "big")
    app1_exif = b"\xff\xe1" + (len(tiff) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    data = jpeg[:2] + app1_xmp + app1_exif + jpeg[2:]
    assert fast_header(data) == ("JPEG", 30, 20, 6) == pil_header(data)
    info = probe_bytes(data, len(data), 1)
    assert (info.width, info.height, info.orientation) == (20, 30, 6)


def test_unusual_files_fall_back_to_pil():
    webp = encode(image((33, 17)), "WEBP")
    assert fast_header(webp) is None
    info = probe_bytes(webp, len(webp), 1)
    assert (info.format, info.width, info.height, info.problem) == ("WEBP", 33, 17, None)
    assert fast_header(b"\xff\xd8\xff\xda\x00\x02") is None


def test_truncation_seen_from_end_markers_only():
    jpeg = encode(image((64, 64)), "JPEG")
    assert probe_bytes(jpeg, 1, 1).problem is None
    assert probe_bytes(jpeg + b"trailer written by a phone", 1, 1).problem is None  # data after EOI is fine
    assert probe_bytes(jpeg[:-2], 1, 1).problem == "truncated_image"
    assert probe_bytes(jpeg[: len(jpeg) // 3], 1, 1).problem == "truncated_image"
    png = encode(image((64, 64)), "PNG")
    assert probe_bytes(png, 1, 1).problem is None
    assert probe_bytes(png[:-12], 1, 1).problem == "truncated_image"
    webp = encode(image((64, 64)), "WEBP")
    assert probe_bytes(webp[:-10], 1, 1).problem == "truncated_image"


def test_verify_decode_decodes(tmp_path):
    jpeg = encode(image((64, 64)), "JPEG")
    assert probe_bytes(jpeg, 1, 1, verify_decode=True).decoded


def test_open_rgb_orients_and_flattens(tmp_path):
    base = image((40, 20), 2)
    p = tmp_path / "r.jpg"
    base.save(p, exif=exif(6))
    assert open_rgb(p).size == (20, 40)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert open_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_one_list_of_image_extensions_and_the_verbs_that_cannot_read_gif_leave_only_it_out():
    from kontext_data.degrade import SOURCE_EXTENSIONS
    from kontext_data.sources import COMPOSITE_EXTENSIONS

    assert ".gif" in IMAGE_EXTENSIONS and is_image_name("sub/a.GIF") and not is_image_name(".hidden.png")
    assert set(COMPOSITE_EXTENSIONS) == set(SOURCE_EXTENSIONS) == IMAGE_EXTENSIONS - {".gif"}
