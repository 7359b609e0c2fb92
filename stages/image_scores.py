"""image_scores: a model's score for every image of a row, the row's score and its threshold.

What the image classifiers (nsfw, watermark) share: each image of a row is decoded by
`stages.images.decode_image` (as every stage sees images: EXIF orientation applied, transparency
composited on white, the first frame, pixels over `max_pixels` refused from the header) at a
reduced scale that keeps its shorter side >= `decode_side`, preprocessed by the stage, and scored
`model_batch_size` at a time while a pool of the worker's threads decodes the next chunk. A row's
score is the maximum over its readable images (one flagged image flags the row); a row without
images gets null and is kept. A row whose score is above `max_score` is rejected with the stage's
verdict (`nsfw: unsafe (nsfw_score 0.8700 > 0.5)`); otherwise a row with an image that could not
be read is rejected as unreadable, in image_check's words
(`nsfw: unreadable image (truncated image: ...)`, "image i of n" for several).

A stage gives: `score_column`, `verdict`, `decode_side`; `setup()` (which loads the model and sets
`_threads`, the decoding threads), `loaded()`, `preprocess(image) -> array` and
`infer(stacked arrays) -> scores`; and parameters `max_score`, `model_batch_size`, `max_pixels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import BatchStage, put_column, reject
from warren.stages.image_check import ImageCheck, pil_limits, with_index
from warren.stages.images import ImageTooLargeError, decode_image


class ImageScoreStage(BatchStage):
    """A per-image model score, its row maximum and a `max_score` filter (see the module)."""

    score_column: ClassVar[str]
    #: The word for a row above the threshold ("unsafe", "watermarked").
    verdict: ClassVar[str]
    #: The shorter side an image keeps when it is decoded at a reduced scale.
    decode_side: ClassVar[int]
    _threads: int = 1

    def loaded(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def preprocess(self, img: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def infer(self, pixels: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_blobs(self, blobs: Sequence[Any]) -> tuple[np.ndarray, list[str | None]]:
        """Scores of encoded images (bytes or pyarrow buffers; None for a missing image), NaN where
        an image could not be read, with the reason (details only) of each unreadable one."""
        if not self.loaded():
            self.setup()
        n = len(blobs)
        scores = np.full(n, np.nan, dtype=np.float32)
        problems: list[str | None] = [None] * n
        step = self.params.model_batch_size
        chunks = [range(lo, min(lo + step, n)) for lo in range(0, n, step)]
        # Decoding and preprocessing (PIL and numpy, which release the GIL) run on a pool of
        # the worker's threads while the model scores the chunk before: the CPUs never wait for
        # one another, and at most two chunks of crops (0.6 MB each) are held at once.
        with pil_limits(self.params.max_pixels), ThreadPoolExecutor(self._threads) as pool:
            ahead = [pool.submit(self._prepare, blobs[k]) for k in chunks[0]] if chunks else []
            for i, chunk in enumerate(chunks):
                prepared = [f.result() for f in ahead]
                if i + 1 < len(chunks):
                    ahead = [pool.submit(self._prepare, blobs[k]) for k in chunks[i + 1]]
                pixels, where = [], []
                for k, (crop, problems[k]) in zip(chunk, prepared, strict=True):
                    if crop is not None:
                        pixels.append(crop)
                        where.append(k)
                if pixels:
                    scores[where] = self.infer(np.stack(pixels).astype(np.float32, copy=False))
        return scores, problems

    def _prepare(self, blob: Any) -> tuple[np.ndarray | None, str | None]:
        """The model's input for one encoded image, or why there is none; never raises for bad
        data."""
        img, problem = decode_blob(
            blob,
            reduce_to=self.decode_side,
            max_pixels=self.params.max_pixels,
            flag=f"--{self.name}.max_pixels",
        )
        return (None, problem) if img is None else (self.preprocess(img), None)

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        n = batch.num_rows
        counts, starts, blobs = row_images(batch)
        flat, problems = self.score_blobs([b.as_buffer() for b in blobs])

        scores = np.full(n, np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * n
        for row in np.flatnonzero(counts):
            lo, count = int(starts[row]), int(counts[row])
            own = flat[lo : lo + count]
            if not np.isnan(own).all():
                scores[row] = np.nanmax(own)
            if scores[row] > p.max_score:  # NaN compares false: no score, no verdict
                reasons[row] = (
                    f"{self.name}: {self.verdict} ({self.score_column} {scores[row]:.4f} > "
                    f"{p.max_score})"
                )
                continue
            bad = next((k for k in range(count) if problems[lo + k] is not None), None)
            if bad is not None:
                reason = f"{self.name}: unreadable image ({problems[lo + bad]})"
                reasons[row] = with_index(reason, bad, count)

        column = pa.array(scores, pa.float32(), mask=np.isnan(scores))
        out = put_column(batch, self.score_column, column)
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out


def decode_blob(
    blob: Any, *, reduce_to: int | None, max_pixels: int, flag: str
) -> tuple[Any, str | None]:
    """(the picture, None) for one encoded image (bytes or a buffer), or (None, why not) in
    image_check's words; never raises for bad data. `flag` names the pixel limit's flag."""
    if blob is None or len(memoryview(blob)) == 0:
        return None, f"empty image ({'null' if blob is None else '0'} bytes)"
    raw = memoryview(blob)
    try:
        return decode_image(
            raw, reduce_to=reduce_to, max_pixels=max_pixels, max_pixels_flag=flag
        ), None
    except ImageTooLargeError as exc:
        return None, f"too many pixels: {exc.detail}"
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder error is bad data
        return None, unreadable_reason(raw, exc, max_pixels)


def unreadable_reason(raw: memoryview, exc: Exception, max_pixels: int) -> str:
    """image_check's words for what is wrong with an image (not an image, truncated, ...), so
    every stage names one file the same way; only called for images that failed."""
    found = ImageCheck(max_pixels=max_pixels).check_one(pa.py_buffer(raw), None)
    if found.reason is not None:
        # "image_check: truncated image (details)" -> "truncated image: details"
        category, _, details = found.reason.split(": ", 1)[1].partition(" (")
        return f"{category}: {details[:-1]}" if details else category
    # image_check could decode it: the failure is in the conversion (an exotic mode).
    message = " ".join(str(exc).split())[:200] or type(exc).__name__
    return f"{type(exc).__name__}: {message}"


def onnxruntime_has_cuda() -> bool:
    """Whether the installed onnxruntime is a CUDA build, read from package metadata so that
    building a stage on the driver imports nothing heavy."""
    import importlib.metadata

    for dist in ("onnxruntime-gpu", "ort-nightly-gpu"):
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def row_images(batch: pa.Table) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Every image of `batch` in one array of encoded bytes (null for a null image), and for each
    row how many it has and where they start: row i owns blobs[starts[i] : starts[i] + counts[i]]."""
    images = batch.column("images").combine_chunks()
    counts = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False)
    # flatten() honours slicing and skips null lists, so the rows' images follow one another.
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    # struct_field propagates null structs to their children: a null image has null bytes.
    return counts, starts, pc.struct_field(images.flatten(), "bytes")


def session_threads(requested: int) -> int:
    """Intra-op threads for a session: `requested` if > 0, else OMP_NUM_THREADS (which Ray sets
    to a worker's CPU share, so actors on one node do not each spawn a thread per core), else 0,
    onnxruntime's own default."""
    if requested > 0:
        return requested
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "0")), 0)
    except ValueError:
        return 0
