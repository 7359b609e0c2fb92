"""Reject rows whose images are cheap-to-spot junk: too small or too large, extreme aspect ratios,
odd file sizes, decompression bombs, animations and multi-page files, and blank images.

The rules follow DataComp's "basic filtering" (shorter side >= 200 px, aspect ratio <= 3; see
`baselines/apply_filter.py` in mlfoundations/datacomp) and Data-Juicer's `image_shape_filter`,
`image_aspect_ratio_filter` and `image_size_filter` (every limit optional). Everything but the
blank rule is read from the image header (`PIL.Image.open` without `load`): no pixel is decoded
for sizes, frame counts or formats, so a decompression bomb is rejected from the size its header
claims and never decoded. Only images that passed every other rule are decoded for the blank
rule, by `stages.images.decode_image` as every stage sees them (orientation, transparency on
white, first frame), at a reduced size (`draft` lets JPEG decode at 1/2..1/8 scale; then a box
filter), so a 105-megapixel photograph is measured, not rejected.

Rules, in the order they are checked (a row reports the first rule its first failing image broke;
a threshold value itself always passes; 0 turns a rule off unless said otherwise):

- `min_bytes`, `max_bytes` (off by default, as in Data-Juicer's `image_size_filter`): size of the
  encoded image in bytes. Reasons `file too small (image_bytes 812 < min_bytes 1024)`,
  `file too large (image_bytes ... > max_bytes ...)`.
- unreadable images (null or empty bytes, not an image, a header PIL cannot parse, EPS, which PIL
  would render with Ghostscript): `unreadable image (<what went wrong>)`. Always on.
- `max_pixels` (default 2**28 = 268,435,456, `stages.images.DEFAULT_MAX_PIXELS`, as `image_check`:
  fixed so that output does not depend on the machine): width * height from the header.
  `too many pixels (30000x30000 = 900000000 pixels > max_pixels 268435456, set by
  --image_filter.max_pixels)`. Cannot be off. An image within it that this machine has no memory
  to decode for the blank rule is rejected as `too many pixels (... > memory limit ...)`.
- `min_width`, `min_height` (200, DataComp's shorter side >= 200): `too small (width 180 <
  min_width 200)`; `max_width`, `max_height` (off): `too large (width 9000 > max_width 8000)`.
- `max_aspect_ratio` (3.0, DataComp and Data-Juicer's 1/3..3): max(w/h, h/w).
  `extreme aspect ratio (aspect_ratio 3.5 > max_aspect_ratio 3)`.
- `max_frames` (1: animated GIF/WebP/PNG and multi-page TIFF are rejected; pretraining wants one
  still picture per image): `multi-frame image (GIF, n_frames 3 > max_frames 1)`. Camera JPEGs
  stored as MPO (a main picture plus previews or a stereo pair) count as one frame.
- `max_blank_share` (0.98): the share of pixels that are the image's dominant colour, measured
  on the image reduced to at most 64 px on its longer side. The dominant colour is the most
  frequent cell of a 32x32x32 RGB histogram (the rounded mean colour of the pixels in that cell);
  a pixel counts as that colour when no channel differs from it by more than `blank_tolerance`
  (8 of 255). Transparent pixels are composited on white first, by `decode_image` (a fully
  transparent image is blank). A flat colour with JPEG noise scores ~1.0; a photo of a white wall keeps its shading
  and detail beyond the tolerance (~0.5), and skimage's sample photos score 0.03-0.3.
  `blank image (blank_share 0.998 > max_blank_share 0.98)`. Sparse line drawings on white
  reach 0.96, hence the high default. This decode also catches truncated
  or corrupt pixel data (`unreadable image (image file is truncated ...)`); with the rule off
  nothing is decoded, and `image_check` is the stage that proves every image decodes.

Rows with several images: every image must pass every rule; the reason names the image, e.g.
`image_filter: too small (image 2 of 3: width 120 < min_width 200)`. Rows without images
(text-only) pass unchanged with null scores.

Score columns (every row with images; null where an image could not be read):

- `width`, `height` (int32): the first image's size, as `image_check` writes it. When
  `image_check` already wrote them they are kept (its nulls are filled from the header).
- `aspect_ratio` (float32), `n_frames` (int32), `blank_share` (float32): the row's worst image,
  i.e. the largest value; `image_bytes` (int64): the smallest image of the row.
- `blank_share` is measured only on images that passed the other rules while the row was still
  kept (the decode is the one costly step); it is null otherwise, and when the rule is off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageFile, UnidentifiedImageError

from warren.stages.base import BatchStage, Resources, beyond, param, put_columns, reject
from warren.stages.image_check import with_index
from warren.stages.images import (
    DEFAULT_MAX_PIXELS,
    ImageTooLargeError,
    decode_image,
    openable_formats,
    size_problem,
)

RULE = "image_filter"
# Longer side of the reduced image the blank rule measures: 4096 pixels are enough to tell a flat
# colour from a picture, and keep the numpy part of the rule small next to the decode.
BLANK_SIDE = 64
# Histogram cell width (per channel) for finding the dominant colour: 8 levels, so noise of a few
# levels keeps most pixels of a flat colour in one or two neighbouring cells.
_CELL_SHIFT = 3


@dataclasses.dataclass(frozen=True)
class ImageFilterParams:
    min_width: int = param(
        200,
        "Reject images narrower than this many pixels; an image exactly this wide passes "
        "(DataComp basic filtering: shorter side >= 200). 0 = off.",
        threshold="min",
        column="width",
        off=0,
    )
    min_height: int = param(
        200,
        "Reject images lower than this many pixels; exactly this high passes. 0 = off.",
        threshold="min",
        column="height",
        off=0,
    )
    max_width: int = param(
        0,
        "Reject images wider than this many pixels; exactly this wide passes. 0 = off.",
        threshold="max",
        column="width",
        off=0,
    )
    max_height: int = param(
        0,
        "Reject images higher than this many pixels; exactly this high passes. 0 = off.",
        threshold="max",
        column="height",
        off=0,
    )
    max_aspect_ratio: float = param(
        3.0,
        "Reject images whose max(width/height, height/width) is above this; exactly this ratio "
        "passes (DataComp basic filtering and Data-Juicer: 3). 0 = off.",
        threshold="max",
        column="aspect_ratio",
        off=0,
    )
    min_bytes: int = param(
        0,
        "Reject encoded images smaller than this many bytes; exactly this size passes. 0 = off.",
        threshold="min",
        column="image_bytes",
        off=0,
    )
    max_bytes: int = param(
        0,
        "Reject encoded images larger than this many bytes; exactly this size passes. 0 = off.",
        threshold="max",
        column="image_bytes",
        off=0,
    )
    max_pixels: int = param(
        DEFAULT_MAX_PIXELS,
        "Reject images whose header claims more pixels (width * height) than this, without "
        "decoding them; exactly this many passes. The default, 2**28 (16384 x 16384), is fixed "
        "so that output does not depend on the machine (see stages.images).",
    )
    max_frames: int = param(
        1,
        "Reject images with more frames than this (animated GIF/WebP/PNG, multi-page TIFF); "
        "exactly this many passes, so 1 keeps still images only. 0 = off.",
        threshold="max",
        column="n_frames",
        off=0,
    )
    max_blank_share: float = param(
        0.98,
        "Reject images whose dominant colour covers more than this share of the pixels "
        "(blank_share, see the module doc); exactly this share passes. 0 = off (no decode).",
        threshold="max",
        column="blank_share",
        off=0,
    )
    blank_tolerance: int = param(
        8,
        "Largest per-channel difference (0-255) from the dominant colour for a pixel to count "
        "as that colour in blank_share.",
    )


@dataclasses.dataclass
class ImageScores:
    """What the filter learned about one image, and the rule it broke (None if it passed)."""

    reason: str | None = None
    width: int | None = None
    height: int | None = None
    image_bytes: int | None = None
    aspect_ratio: float | None = None
    n_frames: int | None = None
    blank_share: float | None = None


class ImageFilter(BatchStage):
    """Reject too small/large, extreme, animated, bomb, odd-sized and blank images, with scores."""

    name = "image_filter"
    # 2: max_pixels 2**28 (was PIL's 89,478,485); blank_share on decode_image's picture.
    version = "2"
    Params = ImageFilterParams
    # Images are inspected one at a time (headers, then one reduced decode), so the batch size only
    # bounds the encoded bytes a worker holds; image_check's 256 keeps the two alike.
    resources = Resources(batch_size=256)
    # width/height are image_check's when it ran before (kept, nulls filled), else written here.
    adds = ("width", "height", "aspect_ratio", "image_bytes", "n_frames", "blank_share")

    def check_params(self) -> None:
        p = self.params
        counts = ("min_width", "min_height", "max_width", "max_height", "min_bytes", "max_bytes")
        for field in (*counts, "max_frames"):
            if getattr(p, field) < 0:
                raise ValueError(f"{self.name}: {field} must be >= 0, got {getattr(p, field)}")
        if p.max_width and p.max_width < p.min_width:
            raise ValueError(f"{self.name}: max_width ({p.max_width}) < min_width ({p.min_width})")
        if p.max_height and p.max_height < p.min_height:
            raise ValueError(
                f"{self.name}: max_height ({p.max_height}) < min_height ({p.min_height})"
            )
        if p.max_bytes and p.max_bytes < p.min_bytes:
            raise ValueError(f"{self.name}: max_bytes ({p.max_bytes}) < min_bytes ({p.min_bytes})")
        if p.max_aspect_ratio != 0 and not p.max_aspect_ratio >= 1:
            raise ValueError(
                f"{self.name}: max_aspect_ratio must be >= 1 or 0 (off), got {p.max_aspect_ratio}"
            )
        if p.max_pixels < 1:
            raise ValueError(f"{self.name}: max_pixels must be >= 1, got {p.max_pixels}")
        if not 0 <= p.max_blank_share <= 1:
            raise ValueError(
                f"{self.name}: max_blank_share must be in [0, 1] (0 = off), got {p.max_blank_share}"
            )
        if not 0 <= p.blank_tolerance <= 255:
            raise ValueError(
                f"{self.name}: blank_tolerance must be in [0, 255], got {p.blank_tolerance}"
            )

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        images = batch.column("images").combine_chunks()
        counts = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # flatten() honours slicing and skips null lists, so row i owns [starts[i], +counts[i]).
        blobs = pc.struct_field(images.flatten(), "bytes")

        reasons: list[str | None] = [None] * n
        width: list[int | None] = [None] * n
        height: list[int | None] = [None] * n
        image_bytes: list[int | None] = [None] * n
        aspect: list[float | None] = [None] * n
        frames: list[int | None] = [None] * n
        blank: list[float | None] = [None] * n
        with header_only_limits():
            for row in range(n):
                count = int(counts[row])
                for k in range(count):
                    s = self.inspect(blobs[int(starts[row]) + k].as_buffer(), reasons[row] is None)
                    if k == 0:
                        width[row], height[row] = s.width, s.height
                    image_bytes[row] = _worst(image_bytes[row], s.image_bytes, min)
                    aspect[row] = _worst(aspect[row], s.aspect_ratio, max)
                    frames[row] = _worst(frames[row], s.n_frames, max)
                    blank[row] = _worst(blank[row], s.blank_share, max)
                    if s.reason is not None and reasons[row] is None:
                        reasons[row] = with_index(s.reason, k, count)

        width_arr = pa.array(width, type=pa.int32())
        height_arr = pa.array(height, type=pa.int32())
        # image_check's width/height are the same first-image sizes; keep them as written.
        if "width" in batch.column_names:
            width_arr = pc.coalesce(
                batch.column("width").combine_chunks().cast(pa.int32()), width_arr
            )
        if "height" in batch.column_names:
            height_arr = pc.coalesce(
                batch.column("height").combine_chunks().cast(pa.int32()), height_arr
            )
        out = put_columns(
            batch,
            {
                "width": width_arr,
                "height": height_arr,
                "aspect_ratio": pa.array(aspect, type=pa.float32()),
                "image_bytes": pa.array(image_bytes, type=pa.int64()),
                "n_frames": pa.array(frames, type=pa.int32()),
                "blank_share": pa.array(blank, type=pa.float32()),
            },
        )
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out

    def inspect(self, data: pa.Buffer | None, measure_blank: bool = True) -> ImageScores:
        """Scores of one encoded image and the first rule it breaks; never raises for bad data.

        Must run inside `header_only_limits()` (as `process` does) so PIL's own bomb check does
        not hide the header's size; `measure_blank=False` skips the one decode.
        """
        p = self.params
        s = ImageScores(image_bytes=None if data is None else data.size)
        if data is not None:
            if p.min_bytes and data.size < p.min_bytes:
                s.reason = (
                    f"{RULE}: file too small (image_bytes {data.size} < min_bytes {p.min_bytes})"
                )
            elif p.max_bytes and data.size > p.max_bytes:
                s.reason = (
                    f"{RULE}: file too large (image_bytes {data.size} > max_bytes {p.max_bytes})"
                )
        if data is None or data.size == 0:
            s.reason = (
                s.reason or f"{RULE}: unreadable image ({'null' if data is None else '0'} bytes)"
            )
            return s
        try:
            with Image.open(io.BytesIO(memoryview(data)), formats=_header_formats()) as img:
                w, h = img.size
                s.width, s.height = w, h
                s.aspect_ratio = max(w / h, h / w) if w > 0 and h > 0 else None
                if s.reason is None:
                    s.reason = self._size_reason(w, h, s.aspect_ratio)
                if w * h > p.max_pixels:
                    # Past this point PIL would allocate the claimed pixels; frames and blank
                    # stay unknown rather than risk it.
                    return s
                # `is_animated` only looks for a second frame; n_frames walks every frame header.
                # MPO is a camera JPEG carrying a preview or a stereo pair, not an animation: its
                # first picture is the photo.
                animated = img.format != "MPO" and getattr(img, "is_animated", False)
                s.n_frames = img.n_frames if animated else 1
                if s.reason is None and p.max_frames and s.n_frames > p.max_frames:
                    s.reason = (
                        f"{RULE}: multi-frame image ({img.format}, n_frames {s.n_frames} > "
                        f"max_frames {p.max_frames})"
                    )
                if s.reason is None and measure_blank and p.max_blank_share:
                    picture = decode_image(
                        data,
                        reduce_to=BLANK_SIDE,
                        max_pixels=p.max_pixels,
                        max_pixels_flag=f"--{self.name}.max_pixels",
                    )
                    s.blank_share = blank_share(picture, p.blank_tolerance)
                    if s.blank_share > p.max_blank_share:
                        s.reason = (
                            f"{RULE}: blank image (blank_share "
                            f"{beyond(s.blank_share, p.max_blank_share)} > max_blank_share "
                            f"{p.max_blank_share:g})"
                        )
        except ImageTooLargeError as exc:  # over the memory limit when decoding for blank_share
            s.reason = s.reason or f"{RULE}: too many pixels ({exc.detail})"
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser error is bad data
            if isinstance(exc, UnidentifiedImageError):
                head = bytes(memoryview(data)[:8]).hex()
                message = f"not an image PIL reads here, starts with {head}"
            else:
                message = str(exc).strip() or type(exc).__name__
            s.reason = s.reason or f"{RULE}: unreadable image ({message})"
        return s

    def _size_reason(self, w: int, h: int, aspect: float | None) -> str | None:
        p = self.params
        too_many = size_problem(w, h, p.max_pixels, f"--{self.name}.max_pixels")
        if too_many:
            return f"{RULE}: too many pixels ({too_many})"
        if w < p.min_width:
            return f"{RULE}: too small (width {w} < min_width {p.min_width})"
        if h < p.min_height:
            return f"{RULE}: too small (height {h} < min_height {p.min_height})"
        if p.max_width and w > p.max_width:
            return f"{RULE}: too large (width {w} > max_width {p.max_width})"
        if p.max_height and h > p.max_height:
            return f"{RULE}: too large (height {h} > max_height {p.max_height})"
        if aspect is None:
            return f"{RULE}: unreadable image (size {w}x{h})"
        if p.max_aspect_ratio and aspect > p.max_aspect_ratio:
            return (
                f"{RULE}: extreme aspect ratio (aspect_ratio {beyond(aspect, p.max_aspect_ratio)} "
                f"> max_aspect_ratio {p.max_aspect_ratio:g})"
            )
        return None


def blank_share(img: Image.Image, tolerance: int = 8, side: int = BLANK_SIDE) -> float:
    """Share of pixels within `tolerance` (per channel) of the dominant colour, measured on an RGB
    picture (as `decode_image` gives it) reduced to at most `side` pixels on its longer side
    (see the module doc)."""
    factor = max(1, max(img.size) // side)
    arr = np.asarray((img.reduce(factor) if factor > 1 else img).convert("RGB"))
    # Channel planes (3, N): numpy reduces along a contiguous last axis far faster than across
    # the 3-wide axis of (N, 3) pixels, and this runs on every kept image.
    planes = np.ascontiguousarray(arr.reshape(-1, 3).T).astype(np.int16)
    cells = planes >> _CELL_SHIFT
    keys = (cells[0] << 10) | (cells[1] << 5) | cells[2]
    dominant = np.bincount(keys.astype(np.intp)).argmax()
    centre = np.rint(planes[:, keys == dominant].mean(axis=1)).astype(np.int16)
    near = (np.abs(planes - centre[:, None]) <= tolerance).all(axis=0)
    return float(np.count_nonzero(near)) / near.size


@contextlib.contextmanager
def header_only_limits() -> Iterator[None]:
    """PIL's own bomb check off (so the header's claimed size can be read and reported, and
    `max_pixels` applied before anything is decoded) and truncated files refused, for the block.

    Safe because `ImageFilter.inspect` decodes nothing but images within `max_pixels`.
    """
    old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
        ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated


def _header_formats() -> list[str]:
    return openable_formats()


def _worst(current, new, pick):
    if new is None:
        return current
    return new if current is None else pick(current, new)
