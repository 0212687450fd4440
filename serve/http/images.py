"""Reading a client's keyframe image (a storyboard panel): bytes in, one checked RGB picture out, or a 400
with its own code. Pillow does the decoding; the rules are this module's:

    formats     PNG, JPEG and WebP only (Pillow is told to try no other decoder); anything else, and a
                file Pillow cannot decode to the end, is `invalid_image`.
    bytes       at most MAX_IMAGE_BYTES (8 MiB) of encoded image: `image_too_large`.
    pixels      at most MAX_IMAGE_PIXELS (4096 x 4096 = 16.8 MP), read from the header before any pixel is
                decoded: `image_too_large`.
    bombs       Pillow's own decompression-bomb check (its DecompressionBombWarning made an error, and its
                DecompressionBombError) refuses a header that declares more than Pillow's
                Image.MAX_IMAGE_PIXELS: `decompression_bomb`, before any pixel is decoded.
    animation   an animated image (more than one frame: APNG, animated WebP) is refused, not cut to its
                first frame, since which frame the client meant is a guess: `animated_image`.
    colour      converted, never refused: EXIF orientation applied first (a phone photo stands upright);
                CMYK, greyscale, 16-bit and palette images become RGB by Pillow's conversions; an alpha
                channel (RGBA, LA, a palette's transparency) is composited over white, as a panel drawn
                on paper would be.

A data URL (`data:image/png;base64,...`) is decoded by `image_from_data_url`; an http(s) URL is never
fetched (`image_url_not_allowed`): the Ingress makes no outbound requests for a client.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from serve.http.errors import ApiError

MAX_IMAGE_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP")
PAPER = (255, 255, 255)  # what a transparent pixel becomes

_DATA_URL = re.compile(
    r"data:(?P<media>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


def read_image(data: bytes, param: str) -> Image.Image:
    """The image in `data` as RGB (the module's rules), or ApiError 400 naming `param`."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(
            400,
            "image_too_large",
            f"`{param}` is {len(data):,} bytes; a keyframe image may be at most {MAX_IMAGE_BYTES:,} bytes",
            param,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ApiError(
                400,
                "decompression_bomb",
                f"`{param}` declares more pixels than a keyframe may have ({MAX_IMAGE_PIXELS:,} at most); "
                "it looks like a decompression bomb and was not decoded",
                param,
            ) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise _invalid(param) from None
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ApiError(
                400,
                "image_too_large",
                f"`{param}` is {width}x{height} pixels; a keyframe may have at most {MAX_IMAGE_PIXELS:,} "
                "(4096x4096)",
                param,
            )
        if getattr(image, "n_frames", 1) > 1:
            raise ApiError(
                400,
                "animated_image",
                f"`{param}` is an animated {image.format} of {image.n_frames} frames; send one still image "
                "(a keyframe is one frame)",
                param,
            )
        try:
            image.load()
            return _as_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError, SyntaxError):
            raise _invalid(param) from None


def image_from_data_url(url: str, param: str) -> Image.Image:
    """The image of a base64 `data:` URL; 400 `image_url_not_allowed` for http(s), else `invalid_data_url`."""
    if re.match(r"https?://", url, re.IGNORECASE):
        raise ApiError(
            400,
            "image_url_not_allowed",
            f"`{param}` is a web address; Previz does not fetch images from URLs. Send the image itself: "
            "a multipart file, or a data URL (`data:image/png;base64,...`)",
            param,
        )
    match = _DATA_URL.match(url)
    if match is None or match.group("b64") is None:
        raise ApiError(
            400,
            "invalid_data_url",
            f"`{param}` must be a base64 data URL such as `data:image/png;base64,iVBOR...`",
            param,
        )
    encoded = url[match.end() :]
    if len(encoded) > (MAX_IMAGE_BYTES // 3 + 1) * 4 + 64:  # base64 of the byte bound, plus padding slack
        raise ApiError(
            400,
            "image_too_large",
            f"`{param}` holds more than {MAX_IMAGE_BYTES:,} bytes; a keyframe image may be at most that",
            param,
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", encoded), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, "invalid_data_url", f"`{param}` is not valid base64 after its comma", param
        ) from None
    return read_image(data, param)


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA")  # a palette's transparency becomes alpha, composited below
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (*PAPER, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's 'I' -> 'L' clips instead of scaling: scale 16 bits down to 8 first
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")


def _invalid(param: str) -> ApiError:
    return ApiError(
        400,
        "invalid_image",
        f"`{param}` is not an image Previz reads: send a PNG, JPEG or WebP still image",
        param,
    )
