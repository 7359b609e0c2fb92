"""Reject rows whose images cannot be trained on: empty, not an image, decompression bombs, corrupt
or truncated data, and (when asked) animations, tiny images or rows without any image.

Every image of every row is identified from its bytes (never from a file extension), its size is
read from the header, and only then, if the size is within the limits, it is decoded the way every
consumer decodes it (`stages.images.decode_image`: orientation, transparency, mode conversion,
first frame), so that corrupt and truncated files, and files no consumer could turn into a
picture, are caught here rather than in a trainer's data loader. A JPEG is decoded at 1/8 scale
(every coefficient is still read, so truncation and corruption are still found, in 1/64 of the
memory): a 105-megapixel photograph is checked, not rejected.

Two limits, both checked from the header before any pixel is decoded
(`image_check: too many pixels (<which limit>)`):

- `max_pixels`: width * height as the header claims it, default 2**28 = 268,435,456
  (`stages.images.DEFAULT_MAX_PIXELS`): fixed, so that the output does not depend on the machine;
  above every genuine photograph (100-150 MP) and below the usual bombs (20000 x 20000,
  30000 x 30000). The reason says `> max_pixels N, set by --image_check.max_pixels`.
- memory: the bytes the decode would take (at the reduced JPEG scale) against a quarter of this
  machine's memory, the one machine-dependent rule; the reason says `> memory limit`.

Adds `width` and `height` (int32) of each row's first image as stored (EXIF orientation is not
applied); they are null when that image could not be decoded. A row is rejected with the reason of
its first failing image; rows with several images say which one, e.g.
`"image_check: truncated image (image 2 of 3: image file is truncated (79 bytes not processed))"`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from warren.stages.base import BatchStage, Resources, param, put_column, reject
from warren.stages.images import (
    DEFAULT_MAX_PIXELS,
    ImageTooLargeError,
    bomb_limits,
    decode_image,
    openable_formats,
    size_problem,
)
from warren.stages.images import (
    EXCLUDED_FORMATS as EXCLUDED_FORMATS,  # re-exported: image_filter and others import it here
)

RULE = "image_check"

# The shorter side a JPEG is decoded down to: the check needs no pixels, only proof that every
# coefficient decodes, and DCT scaling stops at 1/8 whatever is asked.
_CHECK_SIDE = 1
# Leading bytes of formats commonly found where an image was expected, used to say what a blob
# that PIL cannot identify is: a damaged image ("image"), an image format PIL does not decode here
# ("unsupported"), or something else entirely (the usual web-scrape failures: pages, archives).
_SIGNATURES: list[tuple[bytes, str, str]] = [
    (b"\x89PNG\r\n\x1a\n", "PNG", "image"),
    (b"\xff\xd8\xff", "JPEG", "image"),
    (b"GIF87a", "GIF", "image"),
    (b"GIF89a", "GIF", "image"),
    (b"BM", "BMP", "image"),
    (b"II*\x00", "TIFF", "image"),
    (b"MM\x00*", "TIFF", "image"),
    (b"\x00\x00\x01\x00", "ICO", "image"),
    (b"%!PS", "PostScript", "unsupported"),
    (b"\xc5\xd0\xd3\xc6", "PostScript", "unsupported"),
    (b"%PDF", "PDF", "other"),
    (b"PK\x03\x04", "ZIP", "other"),
    (b"\x1f\x8b", "gzip", "other"),
]
_TEXT_MARKERS: list[tuple[bytes, str, str]] = [
    (b"<!doctype html", "HTML", "other"),
    (b"<html", "HTML", "other"),
    (b"<svg", "SVG", "unsupported"),
    (b"<?xml", "XML", "other"),
    (b"{", "JSON", "other"),
    (b"[", "JSON", "other"),
]
_HEIF_BRANDS = {"heic", "heix", "hevc", "hevx", "heim", "heis", "mif1", "msf1"}
_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


@dataclasses.dataclass(frozen=True)
class ImageCheckParams:
    max_pixels: int = param(
        DEFAULT_MAX_PIXELS,
        "Reject images whose header claims more than this many pixels (width * height), before "
        "decoding them; PIL's own decompression-bomb limit is set to the same value. The default, "
        "2**28 (16384 x 16384), is fixed so that output does not depend on the machine; images "
        "within it that this machine has no memory to decode are rejected as over the memory limit.",
    )
    min_side: int = param(1, "Reject images whose shorter side is below this many pixels.")
    require_image: bool = param(True, "Reject rows with no image at all (null or empty `images`).")
    allow_animated: bool = param(
        True,
        "Keep multi-frame images (animated GIF/WebP/PNG, multi-page TIFF); False rejects them.",
    )


@dataclasses.dataclass
class _ImageResult:
    """Outcome of checking one image: a rejection reason, or the decoded size."""

    reason: str | None = None
    size: tuple[int, int] | None = None


class ImageCheck(BatchStage):
    """Decode every image of every row; reject rows with an unusable image, add width/height."""

    name = "image_check"
    # 2: max_pixels 2**28 (was PIL's 89,478,485); images decoded as stages.images decodes them.
    version = "2"
    Params = ImageCheckParams
    # Decoding dominates; modest batches keep a worker's memory bounded by a few hundred images.
    resources = Resources(batch_size=256)
    adds = ("width", "height")

    def check_params(self) -> None:
        p = self.params
        if p.max_pixels < 1:
            raise ValueError(f"{self.name}: max_pixels must be >= 1, got {p.max_pixels}")
        if p.min_side < 0:
            raise ValueError(f"{self.name}: min_side must be >= 0, got {p.min_side}")

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        images = batch.column("images").combine_chunks()
        counts = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # flatten() honours slicing and skips null lists, so row i owns [starts[i], +counts[i]).
        items = images.flatten()
        # struct_field propagates null structs to their children: a null image has null bytes.
        blobs = pc.struct_field(items, "bytes")
        paths = pc.struct_field(items, "path")

        reasons: list[str | None] = [None] * n
        widths: list[int | None] = [None] * n
        heights: list[int | None] = [None] * n
        with pil_limits(self.params.max_pixels):
            for row in range(n):
                count = int(counts[row])
                if count == 0:
                    if self.params.require_image:
                        reasons[row] = f"{RULE}: no image"
                    continue
                for k in range(count):
                    j = int(starts[row]) + k
                    result = self.check_one(blobs[j].as_buffer(), paths[j].as_py())
                    if k == 0 and result.size is not None:
                        widths[row], heights[row] = result.size
                    if result.reason is not None:
                        reasons[row] = with_index(result.reason, k, count)
                        break

        out = put_column(batch, "width", pa.array(widths, type=pa.int32()))
        out = put_column(out, "height", pa.array(heights, type=pa.int32()))
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out

    def check_one(self, data: pa.Buffer | None, path: str | None) -> _ImageResult:
        """Identify, size-check and fully decode one image; never raises for bad data."""
        p = self.params
        if data is None or data.size == 0:
            where = f"; path {path!r}" if path else ""
            state = "null bytes" if data is None else "0 bytes"
            return _ImageResult(f"{RULE}: empty image ({state}{where})")
        raw = memoryview(data)
        flag = f"--{self.name}.max_pixels"
        try:
            # The header only, PIL's own check off, so the claimed size is reported in full.
            with bomb_limits(None):
                img = Image.open(io.BytesIO(raw), formats=openable_formats())
            with img:
                problem = size_problem(*img.size, p.max_pixels, flag)
                if problem:
                    return _ImageResult(f"{RULE}: too many pixels ({problem})")
                picture = decode_image(
                    raw, reduce_to=_CHECK_SIDE, max_pixels=p.max_pixels, max_pixels_flag=flag
                )
                width, height = picture.info["stored_size"]
                if min(width, height) < p.min_side:
                    return _ImageResult(
                        f"{RULE}: too small ({width}x{height}, shorter side < min_side {p.min_side})",
                        (width, height),
                    )
                if not p.allow_animated:
                    frames = getattr(img, "n_frames", 1)
                    if frames > 1:
                        return _ImageResult(
                            f"{RULE}: animated image ({img.format}, {frames} frames)",
                            (width, height),
                        )
                return _ImageResult(None, (width, height))
        except ImageTooLargeError as exc:
            return _ImageResult(f"{RULE}: too many pixels ({exc.detail})")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # PIL's own check, where a plugin asks it later (a frame, an icon size).
            found = _BOMB_PIXELS.search(str(exc))
            pixels = found.group(1) if found else "?"
            return _ImageResult(
                f"{RULE}: too many pixels ({pixels} pixels > max_pixels {p.max_pixels}, "
                f"set by {flag})"
            )
        except UnidentifiedImageError:
            return _ImageResult(_unidentified_reason(raw))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder error is bad data
            return _ImageResult(_decode_error_reason(exc, raw))


def with_index(reason: str, index: int, count: int) -> str:
    """Put "image i of n" in front of the details of a multi-image row's reason."""
    if count == 1:
        return reason
    where = f"image {index + 1} of {count}"
    head, sep, details = reason.partition(" (")
    return f"{head} ({where}: {details}" if sep else f"{head} ({where})"


def _decode_error_reason(exc: Exception, raw: memoryview) -> str:
    message = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, OSError | SyntaxError | ValueError):
        message = f"{type(exc).__name__}: {message}"
    if _looks_truncated(exc, raw):
        return f"{RULE}: truncated image ({message})"
    return f"{RULE}: corrupt image ({message})"


def _looks_truncated(exc: Exception, raw: memoryview) -> bool:
    if isinstance(exc, EOFError) or "truncat" in str(exc).lower():
        return True
    # RIFF containers (WebP) declare their length; libwebp only says "could not create decoder".
    head = bytes(raw[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return len(raw) < declared
    return False


def _unidentified_reason(raw: memoryview) -> str:
    head = bytes(raw[:16])
    label, kind = _sniff(bytes(raw[:256]))
    if kind == "image":
        return f"{RULE}: corrupt image ({label} signature but unreadable header, {len(raw)} bytes)"
    if kind == "unsupported":
        return f"{RULE}: unsupported format ({label}, starts with {head.hex()})"
    label = f"{label}, " if label else ""
    return f"{RULE}: not an image ({label}starts with {head.hex()})"


def _sniff(head: bytes) -> tuple[str | None, str]:
    """Name the format of a blob PIL could not identify, and its kind (see `_SIGNATURES`)."""
    for magic, label, kind in _SIGNATURES:
        if head.startswith(magic):
            return label, kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP", "image"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        if brand in {"avif", "avis"}:
            return "AVIF", "image" if "AVIF" in _decodable_formats() else "unsupported"
        if brand in _HEIF_BRANDS:
            return "HEIF", "unsupported"
        return f"ISO media {brand!r}", "other"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for marker, label, kind in _TEXT_MARKERS:
        if text.startswith(marker):
            return label, kind
    # A cut inside a multi-byte character at the end of the sample is still text.
    decoded = head.decode("utf-8", "replace").rstrip("\ufffd")
    if (
        decoded
        and "\ufffd" not in decoded
        and all(c.isprintable() or c in "\t\r\n" for c in decoded)
    ):
        return "text", "other"
    return None, "other"


def _decodable_formats() -> list[str]:
    return openable_formats()


@contextlib.contextmanager
def pil_limits(max_pixels: int) -> Iterator[None]:
    """PIL's bomb limit set to `max_pixels` (its warning raised as an error) and truncated files
    refused, for the duration of the block (`stages.images.bomb_limits`)."""
    with bomb_limits(max_pixels):
        yield
