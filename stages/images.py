"""images: the one way every stage, trainer and report sees an image's pixels.

`decode_image(data)` turns encoded bytes into the RGB picture a person (and a trainer) would see:

1. **Format from the bytes**, never from a file name; EPS is never opened (PIL would run
   Ghostscript on untrusted bytes).
2. **Size limits before any pixel is decoded**: the header's width x height against `max_pixels`
   (default `DEFAULT_MAX_PIXELS`, fixed, see below), and the memory the decode would take against
   `memory_limit` (default: a quarter of this machine's memory). PIL's own bomb check is set to
   the same `max_pixels` (its warning raised as an error) and truncated files are refused, so no
   PIL code path allocates more. Over either limit: `ImageTooLargeError`, saying which limit.
3. **Downscale on load** when the caller says how much it needs (`reduce_to`: the shorter side it
   needs, e.g. twice a model's input side as PIL's `thumbnail` does with `reducing_gap=2`): JPEG
   decodes at 1/2, 1/4 or 1/8 scale (`draft`), and any format is then box-reduced by an integer
   factor, never below `reduce_to`. Only the resolution changes: a consumer that resizes to its
   own input anyway computes (nearly) the same thing from fewer pixels.
4. **First frame** of an animation (GIF, APNG, WebP, MPO, multi-page TIFF): PIL opens at frame 0.
5. **Modes**: palette and alpha (RGBA, LA, PA, P or L/RGB with a tRNS transparency entry, 16-bit
   grey with a tRNS key) are **composited onto `background`** (white by default) with exact
   rounding, `round(c * a / 255 + bg * (1 - a / 255))`, so what sits under a transparent pixel
   never shows. 16-bit grey (I;16, I) is scaled 65535 -> 255 (divided by 257), not clipped; float
   (F) is read as [0, 1] when it fits there, else as 0..255. CMYK with an embedded ICC profile,
   and LAB, go through littlecms to sRGB; other modes (1, L, P, CMYK without a profile, YCbCr,
   HSV) through PIL's conversion. RGB colour profiles are not applied (as every trainer's loader).
6. **EXIF orientation** (tag 274, or XMP's, as PIL reads it) applied, as `ImageOps.exif_transpose`.

The result is a loaded RGB image, independent of the bytes, whose `info` holds only
`source_size`, the full-resolution size as displayed (after orientation, before any reduction),
and `stored_size`, the same as stored in the file (before orientation).

Why the default `max_pixels` is a fixed number and not read from the machine: the same input and
parameters must give the same output on every machine, and a limit read from memory would keep an
image on one machine and reject it on another. 2**28 = 268,435,456 pixels (16384 x 16384) is
above every genuine photograph a camera writes (the largest single-shot sensors are 100-150 MP)
and below the usual bombs (a 20000 x 20000 or 30000 x 30000 header); decoding it takes at most
about 1 GiB as RGBA, which any worker we target holds. The memory limit is the one rule that
depends on the machine: it only refuses images that `max_pixels` admits and this machine cannot
decode, and the reason says so, so a difference between machines is never silent.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageFile

#: Formats PIL can identify that are never opened: EPS is rendered by running Ghostscript, an
#: external interpreter, on the bytes, which has no place in a pipeline fed with untrusted data.
EXCLUDED_FORMATS = frozenset({"EPS"})
#: The default background transparent pixels are composited onto.
WHITE = (255, 255, 255)
#: The default limit on width * height (see the module docstring for why it is fixed).
DEFAULT_MAX_PIXELS = 2**28
#: Modes whose pixels carry an alpha channel.
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ORIENTATION = 0x0112
# Orientations that swap width and height.
_SWAPS = frozenset(
    {
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_270,
    }
)


class ImageTooLargeError(Image.DecompressionBombError):
    """An image over a size limit, refused before its pixels were decoded.

    `limit` is "max_pixels" or "memory"; `detail` says the numbers, e.g.
    "30000x30000 = 900000000 pixels > max_pixels 268435456".
    """

    def __init__(self, detail: str, limit: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.limit = limit


# ---------------------------------------------------------------------------------------------
# limits


@functools.cache  # read once per process, not once per image
def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup limit when lower
    (a container's limit is what an allocation runs into)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def default_memory_limit() -> int:
    """Bytes one decode may take: a quarter of the machine's memory (several workers decode at
    once, and each also holds its batch)."""
    return machine_memory() // 4


def decode_memory(width: int, height: int, mode: str, alpha: bool) -> int:
    """Bytes `decode_image` holds at its peak for an image decoded at width x height in `mode`:
    PIL's own storage of the mode (1 byte per pixel for 1/L/P, 2 for I;16, 4 for every other
    mode, RGB included), the RGB result, and for alpha the RGBA copy, its mask and the
    background."""
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * (stored + 4 + (9 if alpha else 0))


def size_problem(width: int, height: int, max_pixels: int, flag: str | None = None) -> str | None:
    """Why width x height is over `max_pixels` (naming the flag that sets it), or None."""
    if width * height > max_pixels:
        return f"{width}x{height} = {width * height} pixels > {_max_pixels(max_pixels, flag)}"
    return None


def _max_pixels(max_pixels: int, flag: str | None) -> str:
    return f"max_pixels {max_pixels}" + (f", set by {flag}" if flag else "")


def memory_problem(need: int, limit: int, width: int, height: int) -> str | None:
    """Why a decode needing `need` bytes is over the memory limit, or None."""
    if need > limit:
        return (
            f"decoding {width}x{height} needs {need / 2**30:.2f} GiB > memory limit "
            f"{limit / 2**30:.2f} GiB, a quarter of this machine's memory"
        )
    return None


@contextlib.contextmanager
def bomb_limits(max_pixels: int | None) -> Iterator[None]:
    """PIL's bomb limit set to `max_pixels` (its warning raised as an error; None turns PIL's
    check off, for code that checks the header itself) and truncated files refused, for the
    duration of the block; the previous global settings are restored after."""
    old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
        ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated


_FORMATS: list[str] | None = None


def openable_formats() -> list[str]:
    """The formats PIL identifies here, EPS excluded."""
    global _FORMATS
    if _FORMATS is None:
        Image.init()
        _FORMATS = [f for f in Image.OPEN if f not in EXCLUDED_FORMATS]
    return _FORMATS


def has_alpha(img: Image.Image) -> bool:
    """Whether an opened image carries transparency: an alpha channel or a tRNS entry."""
    return img.mode in ALPHA_MODES or "transparency" in img.info


# ---------------------------------------------------------------------------------------------
# decoding


def decode_image(
    data: bytes | memoryview | Any,
    *,
    background: tuple[int, int, int] = WHITE,
    reduce_to: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_pixels_flag: str | None = None,
    memory_limit: int | None = None,
) -> Image.Image:
    """The RGB picture encoded in `data` (see the module docstring for every rule).

    `reduce_to`: the shorter side the caller needs; the image may be decoded smaller than stored,
    never below it (None: full resolution). `max_pixels_flag` names the flag that set
    `max_pixels` in the error. `memory_limit`: bytes one decode may take (None: a quarter of the
    machine's memory). Raises `ImageTooLargeError` over a limit, and PIL's own errors
    (`UnidentifiedImageError`, OSError, ...) for bytes that are not a decodable image.
    """
    raw = data if isinstance(data, bytes | memoryview) else memoryview(data)
    if len(raw) == 0:
        raise ValueError("empty image (0 bytes)")
    limit = default_memory_limit() if memory_limit is None else memory_limit
    # PIL's own check off while the header is read, so the size it claims can be reported in
    # full (PIL's message has no width and height); `_decode_opened` checks it before any pixel
    # is decoded and turns PIL's check back on at `max_pixels` for everything after.
    with bomb_limits(None):
        img = Image.open(io.BytesIO(raw), formats=openable_formats())
    with img:
        return _decode_opened(img, background, reduce_to, max_pixels, max_pixels_flag, limit)


def _decode_opened(
    img: Image.Image,
    background: tuple[int, int, int],
    reduce_to: int | None,
    max_pixels: int,
    max_pixels_flag: str | None,
    memory_limit: int,
) -> Image.Image:
    width, height = img.size
    problem = size_problem(width, height, max_pixels, max_pixels_flag)
    if problem:
        raise ImageTooLargeError(problem, "max_pixels")
    drafted = False
    if reduce_to and img.format in ("JPEG", "MPO"):
        drafted = True
        # DCT scaling: decodes every coefficient (so truncation is still caught), at 1/2..1/8
        # of the size, keeping both sides >= reduce_to; mode None keeps the file's colours.
        img.draft(None, (reduce_to, reduce_to))
    alpha = has_alpha(img)
    need = decode_memory(img.size[0], img.size[1], img.mode, alpha)
    problem = memory_problem(need, memory_limit, *img.size)
    if problem:
        raise ImageTooLargeError(problem, "memory")
    with bomb_limits(max_pixels):
        img.load()
    if not drafted:
        width, height = img.size  # a few formats (ICO, ICNS) settle their size on load
    method = _transpose_method(img)
    rgb = _to_rgb(img, background)
    if reduce_to:
        factor = min(rgb.size) // reduce_to
        if factor >= 2:
            # After compositing: the box average is of the colours shown, so RGB hidden under
            # transparent pixels cannot bleed into the reduced picture.
            rgb = rgb.reduce(factor)
    if method is not None:
        rgb = rgb.transpose(method)
    swapped = method in _SWAPS
    rgb.info = {
        "source_size": (height, width) if swapped else (width, height),
        "stored_size": (width, height),
    }
    return rgb


def _transpose_method(img: Image.Image) -> Image.Transpose | None:
    """The transposition EXIF orientation asks for: ImageOps.exif_transpose's table, applied here
    to the small RGB result instead of a full-size copy of the decoded image."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: show the image as stored
        return None
    return {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """A loaded image of any mode as RGB, transparency composited onto `background`."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        grey, alpha = _wide_grey(img)
        rgb = Image.fromarray(grey).convert("RGB")
        return _composite(rgb, alpha, background) if alpha is not None else rgb
    if has_alpha(img):
        rgba = img.convert("RGBA")
        return _composite(rgba.convert("RGB"), rgba.getchannel("A"), background)
    if mode == "RGB":
        return img.copy()
    if mode == "LAB" or (mode == "CMYK" and img.info.get("icc_profile")):
        return _through_icc(img)
    return img.convert("RGB")


def _composite(
    rgb: Image.Image, alpha: Image.Image, background: tuple[int, int, int]
) -> Image.Image:
    # paste with an L mask blends with exact rounding: round(fg * a / 255 + bg * (255 - a) / 255).
    out = Image.new("RGB", rgb.size, tuple(background))
    out.paste(rgb, (0, 0), alpha)
    return out


def _wide_grey(img: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
    """8-bit grey of a 16/32-bit integer or float image (scaled, not clipped), and its alpha from
    a tRNS key (None without one)."""
    values = np.asarray(img)
    if img.mode == "F":
        top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
        grey = np.rint(np.clip(np.nan_to_num(values), 0.0, top) * (255.0 / top))
    else:
        # 16-bit samples: 65535 -> 255 is exactly a division by 257.
        grey = np.rint(np.clip(values.astype(np.float64), 0, 65535) / 257.0)
    alpha = None
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return grey.astype(np.uint8), alpha


def _through_icc(img: Image.Image) -> Image.Image:
    from PIL import ImageCms

    if img.mode == "LAB":
        source = ImageCms.createProfile("LAB")
    else:
        source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
    try:
        return ImageCms.profileToProfile(
            img, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except ImageCms.PyCMSError:
        # A profile littlecms cannot use: PIL's plain conversion still gives a picture.
        return img.convert("RGB")


#: Formats every OpenAI-compatible vision endpoint accepts.
_WEB_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF"})


def endpoint_image_bytes(data: bytes, *, background: tuple[int, int, int] = WHITE) -> bytes:
    """Image bytes to send to a served model so that it sees what every stage sees: `data` itself
    when the file already shows exactly `decode_image`'s picture in a web format (an upright,
    opaque, single-frame RGB or grey JPEG/PNG/WebP/GIF, by far the most common case, so request
    hashes and cached answers stay as they were); otherwise `decode_image`'s picture as PNG
    (transparency composited, orientation applied, first frame, CMYK/16-bit converted).
    Raises as `decode_image` does for bytes that are not a decodable image."""
    with bomb_limits(None):
        img = Image.open(io.BytesIO(data), formats=openable_formats())
    with img:
        as_is = (
            img.size[0] * img.size[1] <= DEFAULT_MAX_PIXELS  # else decode_image says why not
            and img.format in _WEB_FORMATS
            and img.mode in ("RGB", "L")
            and not has_alpha(img)
            and not getattr(img, "is_animated", False)
            # last: for a PNG, reading EXIF may decode the image (its eXIf chunk can follow
            # the pixels), which the size check above has bounded
            and _transpose_method(img) is None
        )
    if as_is:
        return data
    buf = io.BytesIO()
    decode_image(data, background=background).save(buf, format="PNG")
    return buf.getvalue()


def decode_error_words(exc: Exception) -> str:
    """The words for an image that cannot be decoded, free of object addresses (reasons are
    data and must not change from run to run)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, ImageTooLargeError):
        return f"too many pixels: {exc.detail}"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL reads"
    message = re.sub(r" ?<[^>]* at 0x[0-9a-fA-F]+>", "", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {message[:200]}"


__all__ = [
    "decode_error_words",
    "endpoint_image_bytes",
    "DEFAULT_MAX_PIXELS",
    "EXCLUDED_FORMATS",
    "ImageTooLargeError",
    "WHITE",
    "bomb_limits",
    "decode_image",
    "decode_memory",
    "default_memory_limit",
    "has_alpha",
    "machine_memory",
    "memory_problem",
    "openable_formats",
    "size_problem",
]
