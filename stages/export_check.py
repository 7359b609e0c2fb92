"""export_check: reject rows a trainer's loader would choke on, before they are exported.

LLaVA, LLaMA-Factory and TRL each assume the same few things of an instruction row and fail (or,
worse, silently misalign images and text) when a row breaks them. This stage checks them on the
canonical row and rejects the row with the first rule it breaks, in this order:

1. `export_check: no conversations`: a row with null or empty `conversations` that is not a
   caption row (a caption that is not blank, at most one image: the exports write those as
   LLaVA's pretraining pair). With `require_conversations=False` every such row passes; rules 2-3
   do not apply to rows without turns, rules 4-5 still do.
2. The turns: an optional single leading `system` turn, then `human` and `gpt` alternating,
   starting with `human` and ending with `gpt`; every value a non-empty string (whitespace alone
   counts as empty: a blank turn teaches nothing). Reasons, for the first bad turn:
   `export_check: unknown role (turn 3 is 'bot')`, `export_check: empty turn (turn 2, 'gpt')`,
   `export_check: turns do not alternate (turn 3 is 'system', expected 'human')`,
   `export_check: turns do not alternate (ends with 'human', expected 'gpt')`.
3. `export_check: image marker mismatch (2 markers, 1 images)`: the `<image>` markers over all
   turns must equal the number of images (each loader pairs the k-th marker with the k-th image).
4. Every image decodes: its bytes are identified and fully decoded once by PIL (no resizing), with
   the rules and reasons of `image_check` under this stage's name: `export_check: empty image
   (null bytes)`, `export_check: truncated image (...)`, `export_check: corrupt image (...)`,
   `export_check: not an image (...)`, `export_check: too many pixels (...)` (PIL's
   decompression-bomb limit is a rejection, never a crash). Several images: the reason says which,
   `(image 2 of 3: ...)`. `check_images=False` skips this rule (the images were checked upstream).
5. `export_check: unsafe image path (../x.png)`: an image `path`, when not null, must be relative
   and stay inside the image root (the rule of the `llava_json` reader, `safe_relative_path`),
   because the LLaVA and ShareGPT exports write each image at its path under the export folder.

Rows are never dropped; kept rows pass through unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.base import BatchStage, param, reject
from stages.image_check import ImageCheck, pil_limits, with_index
from stages.readers.llava_json import safe_relative_path
from stages.schema import IMAGE_MARKER

RULE = "export_check"
ROLES = ("human", "gpt", "system")


@dataclasses.dataclass(frozen=True)
class ExportCheckParams:
    require_conversations: bool = param(
        True,
        "Reject rows without conversations (caption-only rows). False lets them through, for the "
        "hf export, which keeps captions.",
    )
    check_images: bool = param(
        True, "Decode every image once and reject rows with an image that does not decode."
    )


def turn_problem(turns: list[dict] | None) -> str | None:
    """The reason (category and detail) the turns break the alternation rule, or None."""
    expected = "human"
    for i, turn in enumerate(turns or [], 1):
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            return f"unknown role (turn {i} is {role!r})"
        if not isinstance(value, str) or not value.strip():
            return f"empty turn (turn {i}, {role!r})"
        if role == "system" and i == 1:
            continue
        if role != expected:
            return f"turns do not alternate (turn {i} is {role!r}, expected {expected!r})"
        expected = "gpt" if role == "human" else "human"
    if expected != "human":
        return f"turns do not alternate (ends with 'human', expected {expected!r})"
    if not any(t.get("from") == "gpt" for t in turns or []):
        return "turns do not alternate (no human/gpt turns)"
    return None


def is_caption_row(caption: str | None, images: int) -> bool:
    """A caption row (no turns needed): a caption that is not blank and at most one image; the
    exports write it as LLaVA's pretraining pair (stages.exports.caption)."""
    return isinstance(caption, str) and bool(caption.strip()) and images <= 1


class ExportCheck(BatchStage):
    """Reject rows that break the instruction formats' rules: turns, markers, images, paths."""

    name = "export_check"
    version = "1"
    Params = ExportCheckParams
    # Decoding dominates, as in image_check: modest batches bound a worker's memory.
    batch_size = 256

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        n = batch.num_rows
        conversations = batch.column("conversations").to_pylist()
        captions = batch.column("caption").to_pylist()
        images = batch.column("images").combine_chunks()
        counts = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # flatten() honours slicing and skips null lists, so row i owns [starts[i], +counts[i]).
        items = images.flatten()
        blobs = pc.struct_field(items, "bytes")
        paths = pc.struct_field(items, "path").to_pylist()
        # The decoder of image_check, so both stages give an image the same verdict and wording.
        decoder = ImageCheck(min_side=0)

        reasons: list[str | None] = [None] * n
        with pil_limits(decoder.params.max_pixels):
            for row in range(n):
                turns = conversations[row]
                count = int(counts[row])
                if turns:
                    problem = turn_problem(turns)
                    if problem is None:
                        markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
                        if markers != count:
                            problem = f"image marker mismatch ({markers} markers, {count} images)"
                    if problem is not None:
                        reasons[row] = f"{RULE}: {problem}"
                        continue
                elif p.require_conversations and not is_caption_row(captions[row], count):
                    reasons[row] = f"{RULE}: no conversations"
                    continue
                reasons[row] = self._image_problem(decoder, blobs, paths, int(starts[row]), count)

        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(batch, mask, reasons) if mask.any() else batch

    def _image_problem(
        self, decoder: ImageCheck, blobs: pa.Array, paths: list, start: int, count: int
    ) -> str | None:
        if self.params.check_images:
            for k in range(count):
                result = decoder.check_one(blobs[start + k].as_buffer(), paths[start + k])
                if result.reason is not None:
                    reason = with_index(result.reason, k, count)
                    return RULE + reason.removeprefix(decoder.name)
        for k in range(count):
            path = paths[start + k]
            if path is not None and safe_relative_path(path) is None:
                where = f"image {k + 1} of {count}: " if count > 1 else ""
                return f"{RULE}: unsafe image path ({where}{path})"
        return None


__all__ = ["ExportCheck", "ExportCheckParams", "turn_problem"]
