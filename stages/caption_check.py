"""Reject rows whose caption is missing, blank, too short or too long.

Lengths are counted in Unicode characters (code points) of the caption with leading and trailing
whitespace removed, so padding never makes a caption long enough. Instruction rows (non-empty
`conversations`) carry their text in their turns: with `require_caption=False` such rows pass
without a caption, and a caption they do have is still held to the length limits. Rows without
conversations always need a caption.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import BatchStage, param, reject

RULE = "caption_check"


@dataclasses.dataclass(frozen=True)
class CaptionCheckParams:
    min_chars: int = param(
        1,
        "Reject captions shorter than this many characters (whitespace-trimmed).",
        threshold="min",
        column="caption_chars",
        off=0,
    )
    max_chars: int = param(
        10_000,
        "Reject captions longer than this many characters (whitespace-trimmed).",
        threshold="max",
        column="caption_chars",
    )
    require_caption: bool = param(
        True,
        "Reject rows without a caption. False lets rows with conversations (instruction data) "
        "pass without one; rows without conversations still need a caption.",
    )


class CaptionCheck(BatchStage):
    """Reject missing, empty, too-short and too-long captions, with the length in the reason."""

    name = "caption_check"
    version = "1"
    Params = CaptionCheckParams

    def check_params(self) -> None:
        p = self.params
        if p.min_chars < 0:
            raise ValueError(f"{self.name}: min_chars must be >= 0, got {p.min_chars}")
        if p.max_chars < p.min_chars:
            raise ValueError(
                f"{self.name}: max_chars ({p.max_chars}) must be >= min_chars ({p.min_chars})"
            )

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        caption = batch.column("caption")
        length = pc.utf8_length(pc.utf8_trim_whitespace(caption))  # null where caption is null
        missing = pc.is_null(caption)
        empty = pc.fill_null(pc.equal(length, 0), False)
        too_short = pc.fill_null(
            pc.and_(pc.greater(length, 0), pc.less(length, p.min_chars)), False
        )
        too_long = pc.fill_null(pc.greater(length, p.max_chars), False)
        if not p.require_caption:
            # Instruction rows need no caption; one they do have still obeys the length limits.
            turns = pc.fill_null(pc.list_value_length(batch.column("conversations")), 0)
            captionless_ok = pc.invert(pc.greater(turns, 0))
            missing = pc.and_(missing, captionless_ok)
            empty = pc.and_(empty, captionless_ok)

        length_text = pc.cast(length, pa.string())
        short_reason = pc.binary_join_element_wise(
            f"{RULE}: caption too short (", length_text, f" chars < min_chars {p.min_chars})", ""
        )
        long_reason = pc.binary_join_element_wise(
            f"{RULE}: caption too long (", length_text, f" chars > max_chars {p.max_chars})", ""
        )
        none = pa.scalar(None, pa.string())
        # The rules are exclusive (null, blank, 1..min_chars-1, above max_chars); nesting keeps
        # the reason array to one pass.
        reasons = pc.if_else(
            missing,
            f"{RULE}: missing caption",
            pc.if_else(
                empty,
                f"{RULE}: empty caption",
                pc.if_else(too_short, short_reason, pc.if_else(too_long, long_reason, none)),
            ),
        )
        mask = pc.is_valid(reasons).to_numpy(zero_copy_only=False)
        if not mask.any():
            return batch
        return reject(batch, mask, reasons.to_pylist())
