"""Keyframe images: each refusal has its own code, each conversion its stated result."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve.http.errors import ApiError
from serve.http.images import MAX_IMAGE_BYTES, image_from_data_url, read_image


def encoded(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with one empty data chunk: tiny on the wire."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def refusal(data: bytes) -> str:
    with pytest.raises(ApiError) as refused:
        read_image(data, "input_reference")
    assert refused.value.status == 400 and refused.value.param == "input_reference"
    return refused.value.code


def test_png_jpeg_and_webp_read_as_rgb() -> None:
    picture = Image.new("RGB", (20, 10), (200, 100, 50))
    for format in ("PNG", "JPEG", "WEBP"):
        image = read_image(encoded(picture, format), "p")
        assert image.mode == "RGB" and image.size == (20, 10)


def test_text_and_truncated_files_are_not_images() -> None:
    assert refusal(b"hello, not a picture") == "invalid_image"
    assert refusal(encoded(Image.new("RGB", (64, 64)), "PNG")[:60]) == "invalid_image"


def test_a_format_outside_png_jpeg_webp_is_not_read() -> None:
    assert refusal(encoded(Image.new("RGB", (8, 8)), "BMP")) == "invalid_image"


def test_over_the_byte_bound_is_refused_before_decoding() -> None:
    assert refusal(b"\x89PNG" + b"\0" * MAX_IMAGE_BYTES) == "image_too_large"


def test_over_the_pixel_bound_is_refused_from_the_header() -> None:
    assert refusal(png_header_only(5000, 4000)) == "image_too_large"


def test_a_decompression_bomb_is_refused_by_pillows_check() -> None:
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 100
    assert refusal(bomb) == "decompression_bomb"


def test_an_animated_image_is_refused() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    animated = encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert refusal(animated) == "animated_image"


def test_cmyk_is_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # full magenta and yellow: red
    pixel = np.asarray(read_image(encoded(cmyk, "JPEG", quality=100), "p"))[4, 4]
    assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def test_alpha_is_composited_over_white_paper() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    pixels = np.asarray(read_image(encoded(rgba), "p"))
    assert (pixels[0, 0] == [255, 255, 255]).all() and (pixels[1, 1] == [0, 0, 255]).all()


def test_a_palette_with_transparency_is_composited_too() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    data = encoded(palette, "PNG", transparency=0)
    pixels = np.asarray(read_image(data, "p"))
    assert (pixels[0, 0] == [255, 0, 0]).all() and (pixels[3, 3] == [255, 255, 255]).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert tuple(np.asarray(read_image(encoded(grey), "p"))[0, 0]) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    upright = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 10 wide, 20 high
    assert read_image(encoded(upright, "JPEG", exif=exif), "p").size == (10, 20)


def test_a_data_url_decodes_to_its_image() -> None:
    data = encoded(Image.new("RGB", (6, 4), (1, 2, 3)))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert image_from_data_url(url, "p").size == (6, 4)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.com/panel.png", "image_url_not_allowed"),
        ("HTTP://example.com/panel.png", "image_url_not_allowed"),
        ("data:image/png,rawtext", "invalid_data_url"),
        ("data:image/png;base64,@@@@", "invalid_data_url"),
        ("file:///etc/passwd", "invalid_data_url"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
    ],
)
def test_a_bad_image_url_has_its_code(url: str, code: str) -> None:
    with pytest.raises(ApiError) as refused:
        image_from_data_url(url, "input_reference.image_url")
    assert refused.value.code == code and refused.value.status == 400
