"""ocr: the text in each image, where it is and how much of the image it covers, and filters on it.

Engine. RapidOCR (`rapidocr_onnxruntime`, Apache-2.0): PaddleOCR's PP-OCRv4 text detector and
recogniser and its direction classifier as ONNX graphs shipped inside the wheel, run with
onnxruntime, so it runs offline with nothing to download (the newer `rapidocr` package fetches its
models on first use). It reads Latin and Chinese script. Install it without its dependencies,
`pip install --no-deps rapidocr_onnxruntime==1.4.4` (the README's first command does): it asks for
`opencv-python`, which would sit beside the `opencv-python-headless` warren already has, and two
OpenCV builds in one environment break each other; its other dependencies come with warren. The
engine is built once per worker in `setup()`; on a GPU it runs through onnxruntime's CUDA provider
when the `onnxruntime-gpu` build is installed. The detector takes one image at a time; the
recogniser batches the text lines of an image.

Images are decoded by `stages.images.decode_image` as every stage sees them (transparency on white,
EXIF orientation, the first frame), at a reduced scale that keeps the shorter side >= `decode_side`
(1024: small print stays legible).

Columns, per row (over all of its images):

- `ocr_text`: the lines read, in the engine's reading order, one per line (a blank line between
  images); "" when no text was found, null for a row without images;
- `ocr_boxes`: each line's image index, quadrilateral (x1, y1, ..., x4, y4 in the decoded image's
  pixels, clockwise from the top left), text and confidence;
- `ocr_area`: the share of an image the text covers (the union of the line boxes over the image's
  area), the largest over the row's images;
- `ocr_caption_overlap`: the share of the characters read that the caption's words cover
  (case-blind, spaces ignored, as the recogniser often drops them), null when nothing was read or
  there is no caption: high for alt-text that transcribes a sign, low for a caption that ignores
  the text.

With `append_text` (the Llama 3 recipe's setting) the text read is appended to the caption, on a
line of its own, and the caption as it was is kept in `original_caption`.

Filters, each off by default: `max_area` drops text-heavy images (screenshots, documents, slides)
from a caption pool; `min_area` keeps only images with text, for OCR-rich sets; `min_overlap` keeps
rows whose caption agrees with their text. An image that cannot be read rejects its row, in
image_check's words (`ocr: unreadable image (truncated image: ...)`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pyarrow as pa

from warren.stages.base import BatchStage, Resources, param, put_columns, reject
from warren.stages.image_check import pil_limits, with_index
from warren.stages.image_scores import (
    decode_blob,
    onnxruntime_has_cuda,
    row_images,
    session_threads,
)
from warren.stages.images import DEFAULT_MAX_PIXELS

RULE = "ocr"
PACKAGE = "rapidocr_onnxruntime"
BOX_TYPE = pa.struct(
    [
        pa.field("image", pa.int32()),
        pa.field("box", pa.list_(pa.float32(), 8)),
        pa.field("text", pa.string()),
        pa.field("score", pa.float32()),
    ]
)
_WORDS = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class OcrParams:
    min_text_score: float = param(0.5, "lines the recogniser is less sure of are dropped")
    max_area: float = param(
        1.0,
        "reject rows whose ocr_area is above this (text-heavy images out of a caption pool); "
        "1.0: off",
        threshold="max",
        column="ocr_area",
        off=1.0,
    )
    min_area: float = param(
        0.0,
        "reject rows whose ocr_area is below this (keep text-rich images); 0: off",
        threshold="min",
        column="ocr_area",
        off=0.0,
    )
    min_overlap: float = param(
        0.0,
        "reject rows with text whose ocr_caption_overlap is below this; 0: off",
        threshold="min",
        column="ocr_caption_overlap",
        off=0.0,
    )
    decode_side: int = param(1024, "images are decoded with their shorter side at least this")
    max_pixels: int = param(
        DEFAULT_MAX_PIXELS,
        "images claiming more pixels than this are unreadable (never decoded), as image_check",
    )
    threads: int = param(0, "onnxruntime threads; 0: OMP_NUM_THREADS (Ray's CPU share), else all")
    append_text: bool = param(
        False,
        "append the text read to the caption (Llama 3), keeping the caption in original_caption",
    )


def text_area(boxes: list[list[list[float]]], width: int, height: int) -> float:
    """The share of a width x height image that the union of the quadrilaterals covers."""
    from shapely.geometry import Polygon, box
    from shapely.ops import unary_union

    if not boxes or width * height == 0:
        return 0.0
    shapes = [Polygon(b).buffer(0) for b in boxes]  # buffer(0) mends self-crossing quads
    covered = unary_union(shapes).intersection(box(0, 0, width, height))
    return float(min(1.0, covered.area / (width * height)))


def caption_overlap(ocr_text: str | None, caption: str | None) -> float | None:
    """The share of the characters read (letters and digits, case-blind, spaces ignored: the
    recogniser often drops them) that the caption's words of two or more characters cover; None
    when nothing was read or there is no caption."""
    read = "".join(_WORDS.findall((ocr_text or "").casefold()))
    if not read or not caption:
        return None
    covered = np.zeros(len(read), bool)
    for word in {w for w in _WORDS.findall(caption.casefold()) if len(w) >= 2}:
        start = read.find(word)
        while start >= 0:
            covered[start : start + len(word)] = True
            start = read.find(word, start + 1)
    return float(covered.mean())


class Ocr(BatchStage):
    """Text in images (RapidOCR, offline): ocr_text, ocr_boxes, ocr_area, caption overlap."""

    name = RULE
    version = "1"
    Params = OcrParams
    uses_model = True
    # A small detector and recogniser: a quarter of a GPU per actor, asked for only when
    # onnxruntime can use one (the onnxruntime-gpu build; default_resources).
    resources = Resources(num_cpus=1.0, num_gpus=0.25, batch_size=64)
    adds = ("ocr_text", "ocr_boxes", "ocr_area", "ocr_caption_overlap")

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._engine: Any = None

    def default_resources(self) -> Resources:
        if not onnxruntime_has_cuda():
            return type(self).resources.replace(num_gpus=0.0)
        return type(self).resources

    def added_columns(self) -> dict[str, Any]:
        added = {
            "ocr_text": pa.string(),
            "ocr_boxes": pa.list_(BOX_TYPE),
            "ocr_area": pa.float32(),
            "ocr_caption_overlap": pa.float32(),
        }
        if self.params.append_text:
            added["original_caption"] = pa.string()
        return added

    def check_params(self) -> None:
        p = self.params
        for name in ("min_text_score", "max_area", "min_area", "min_overlap"):
            if not 0.0 <= getattr(p, name) <= 1.0:
                raise ValueError(f"{self.name}: {name} must be in [0, 1], got {getattr(p, name)}")
        if p.decode_side < 32 or p.max_pixels < 1 or p.threads < 0:
            raise ValueError(f"{self.name}: decode_side >= 32, max_pixels >= 1, threads >= 0")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None  # onnxruntime sessions do not pickle; each worker builds its own
        return state

    def setup(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ValueError(
                f"{self.name}: the OCR engine is not installed: pip install --no-deps "
                f"{PACKAGE}==1.4.4 (its models ship inside the wheel; see stages/ocr.py)"
            ) from exc
        import onnxruntime as ort

        threads = session_threads(self.params.threads) or -1  # -1: onnxruntime's default
        from warren.stages.models import default_device

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        cuda = cuda and default_device() == "cuda"
        settings: dict[str, Any] = {
            "text_score": self.params.min_text_score,
            "print_verbose": False,
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1,
        }
        for part in ("det", "cls", "rec"):
            settings[f"{part}_use_cuda"] = cuda
        self._engine = RapidOCR(**settings)

    def read(self, img: Any) -> tuple[list[tuple[list[float], str, float]], float]:
        """The lines in one decoded image, (box, text, confidence) each, and their area share."""
        if self._engine is None:
            self.setup()
        found, _ = self._engine(img)
        lines = [
            ([float(v) for point in quad for v in point], str(text), float(score))
            for quad, text, score in (found or [])
        ]
        quads = [[(b[i], b[i + 1]) for i in range(0, 8, 2)] for b, _, _ in lines]
        return lines, text_area(quads, *img.size)

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        n = batch.num_rows
        counts, starts, blobs = row_images(batch)
        captions = (
            batch.column("caption").to_pylist() if "caption" in batch.column_names else [None] * n
        )
        if p.append_text and "ocr_text" in batch.column_names:
            # A re-run over this stage's own output: the caption without the text appended then.
            captions = [
                c[: -len(t) - 1] if c and t and c.endswith("\n" + t) else c
                for c, t in zip(captions, batch.column("ocr_text").to_pylist(), strict=True)
            ]
        texts: list[str | None] = [None] * n
        boxes: list[list[dict] | None] = [None] * n
        areas: list[float | None] = [None] * n
        overlaps: list[float | None] = [None] * n
        reasons: list[str | None] = [None] * n
        with pil_limits(p.max_pixels):
            for row in np.flatnonzero(counts):
                lo, count = int(starts[row]), int(counts[row])
                parts, row_boxes, area = [], [], 0.0
                for k in range(count):
                    img, problem = decode_blob(
                        blobs[lo + k].as_buffer(),
                        reduce_to=p.decode_side,
                        max_pixels=p.max_pixels,
                        flag=f"--{self.name}.max_pixels",
                    )
                    if img is None:
                        if reasons[row] is None:
                            reason = f"{self.name}: unreadable image ({problem})"
                            reasons[row] = with_index(reason, k, count)
                        continue
                    lines, share = self.read(img)
                    area = max(area, share)
                    parts.append("\n".join(text for _, text, _ in lines))
                    row_boxes += [
                        {"image": k, "box": b, "text": t, "score": s} for b, t, s in lines
                    ]
                texts[row] = "\n\n".join(t for t in parts if t)
                boxes[row], areas[row] = row_boxes, area
                overlaps[row] = caption_overlap(texts[row], captions[row])
                if reasons[row] is None:
                    reasons[row] = self._verdict(area, overlaps[row])
        out = put_columns(
            batch,
            {
                "ocr_text": pa.array(texts, pa.string()),
                "ocr_boxes": pa.array(boxes, pa.list_(BOX_TYPE)),
                "ocr_area": pa.array(areas, pa.float32()),
                "ocr_caption_overlap": pa.array(overlaps, pa.float32()),
            },
        )
        if p.append_text:
            # Llama 3 concatenates the text in the image with the caption. A caption an earlier
            # stage replaced (recaption) keeps the original it recorded.
            joined = [
                f"{c}\n{t}" if c and t else (c or t or c)
                for c, t in zip(captions, texts, strict=True)
            ]
            before = (
                batch.column("original_caption").to_pylist()
                if "original_caption" in batch.column_names
                else [None] * n
            )
            originals = [o if o is not None else c for o, c in zip(before, captions, strict=True)]
            out = put_columns(
                out,
                {
                    "original_caption": pa.array(originals, pa.string()),
                    "caption": pa.array(joined, pa.string()),
                },
            )
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out

    def _verdict(self, area: float, overlap: float | None) -> str | None:
        p = self.params
        if area > p.max_area:
            return f"{self.name}: text-heavy (ocr_area {area:.3f} > {p.max_area:g})"
        if area < p.min_area:
            return f"{self.name}: too little text (ocr_area {area:.3f} < {p.min_area:g})"
        if overlap is not None and overlap < p.min_overlap:
            return (
                f"{self.name}: caption ignores the text (ocr_caption_overlap {overlap:.2f} < "
                f"{p.min_overlap:g})"
            )
        return None


__all__ = ["BOX_TYPE", "Ocr", "OcrParams", "caption_overlap", "text_area"]
