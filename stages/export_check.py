"""export_check: reject rows a trainer's loader would choke on, before they are exported.

LLaVA, LLaMA-Factory and TRL each assume the same few things of an instruction row and fail (or,
worse, silently misalign images and text) when a row breaks them. This stage checks them on the
canonical row and rejects the row with the first rule it breaks, in this order:

1. The row's text, by the one definition of `stages.conversation` (the readers apply the same at
   ingest, so a row ingest kept passes here):
   - a conversation row (non-empty `conversations`): an optional single leading `system` turn,
     then `human` and `gpt` alternating, starting with `human` and ending with `gpt`; every value
     a non-empty string; the `<image>` markers over all turns equal the number of images.
     Reasons: `export_check: unknown role (turn 3 is 'bot')`, `export_check: empty turn (turn 2,
     'gpt')`, `export_check: starts with the model's turn (turn 1 is 'gpt')`, `export_check:
     turns do not alternate (turn 3 is 'system', expected 'human')`, `export_check: image marker
     mismatch (2 markers, 1 images)`. Roles are checked as they are, not normalised: a row that
     did not come through a reader (a stage's output) is reported, never silently changed.
   - a caption row (no turns): a non-empty caption without `<image>` and exactly one image; the
     exports write it in LLaVA's pretraining form. Reasons: `export_check: no conversations and
     no caption`, `export_check: caption row without an image`, `export_check: caption row with 2
     images (...)`, `export_check: caption holds an <image> marker (...)`. With `require_conversations=True` caption
     rows are rejected as `export_check: no conversations` (a format that needs turns).
2. Every image decodes: its bytes are identified and fully decoded once by PIL (no resizing), with
   the rules and reasons of `image_check` under this stage's name: `export_check: empty image
   (null bytes)`, `export_check: truncated image (...)`, `export_check: corrupt image (...)`,
   `export_check: not an image (...)`, `export_check: too many pixels (...)` (PIL's
   decompression-bomb limit is a rejection, never a crash). Several images: the reason says which,
   `(image 2 of 3: ...)`. `check_images=False` skips this rule (the images were checked upstream).
3. `export_check: unsafe image path (../x.png)`: an image `path`, when not null, must be relative
   and stay inside the image root (the rule of the `llava_json` reader, `safe_relative_path`),
   because the LLaVA and ShareGPT exports write each image at its path under the export folder.

Rows are never dropped; kept rows pass through unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages import conversation
from warren.stages.base import BatchStage, Resources, param, reject
from warren.stages.image_check import RULE as IMAGE_CHECK_RULE
from warren.stages.image_check import ImageCheck, pil_limits, with_index
from warren.stages.images import DEFAULT_MAX_PIXELS
from warren.stages.readers.llava_json import safe_relative_path

RULE = "export_check"


@dataclasses.dataclass(frozen=True)
class ExportCheckParams:
    require_conversations: bool = param(
        False,
        "Reject caption rows (no conversations). By default they pass: every export writes a "
        "caption row in LLaVA's pretraining form.",
    )
    check_images: bool = param(
        True, "Decode every image once and reject rows with an image that does not decode."
    )
    max_pixels: int = param(
        DEFAULT_MAX_PIXELS,
        "Reject images whose header claims more than this many pixels (as image_check).",
    )


class ExportCheck(BatchStage):
    """Reject rows that break the instruction formats' rules: turns, markers, images, paths."""

    name = "export_check"
    # 2: stages.conversation's rules; caption rows pass
    version = "2"
    Params = ExportCheckParams
    # Decoding dominates, as in image_check: modest batches bound a worker's memory.
    resources = Resources(batch_size=256)

    def check_params(self) -> None:
        if self.params.max_pixels < 1:
            raise ValueError(f"{self.name}: max_pixels must be >= 1, got {self.params.max_pixels}")

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
        decoder = ImageCheck(min_side=0, max_pixels=p.max_pixels, stage_name=self.name)

        reasons: list[str | None] = [None] * n
        with pil_limits(decoder.params.max_pixels):
            for row in range(n):
                turns = conversations[row]
                count = int(counts[row])
                if not turns and p.require_conversations:
                    reasons[row] = f"{RULE}: no conversations"
                    continue
                problem = conversation.row_problem(turns, captions[row], count)
                if problem is not None:
                    reasons[row] = f"{RULE}: {problem}"
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
                    # image_check's wording under this stage's name (the flag in a reason is ours)
                    return RULE + reason.removeprefix(IMAGE_CHECK_RULE)
        for k in range(count):
            path = paths[start + k]
            if path is not None and safe_relative_path(path) is None:
                where = f"image {k + 1} of {count}: " if count > 1 else ""
                return f"{RULE}: unsafe image path ({where}{path})"
        return None


__all__ = ["ExportCheck", "ExportCheckParams"]
