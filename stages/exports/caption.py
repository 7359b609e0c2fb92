"""Caption rows as conversations: LLaVA's pretraining form, shared by every export.

A caption row (no conversations, a caption that is not blank, at least one image) is exported as
the one-turn conversation of LLaVA's pretraining file LCS-558K (`blip_laion_cc_sbu_558k.json`):

    {"from": "human", "value": "<image>\\nRender a clear and concise summary of the photo."}
    {"from": "gpt", "value": "<the caption, exactly>"}

The human turn comes from a template, default `"<image>\\n{instruction}"`:

- `<image>` (exactly once in the template) stands for the row's images: one marker per image,
  joined by newlines, so markers always equal images;
- `{instruction}` (optional) is one of the 11 brief-description instructions LLaVA drew LCS-558K's
  human turns from (LLaVA paper, Table 8), picked by a hash of the row id, so the same row always
  gets the same instruction whatever the order, the worker or the run.

LCS-558K puts the marker before or after the instruction at random (both forms are in the file);
the default always puts it first. LLaVA's own pretraining (`--version plain`) replaces the human
turn by the marker alone, so the instruction does not change what LLaVA's stage 1 learns; a
template of just `"<image>"` writes that form. The caption itself is kept as it is (no stripping).

Rows with conversations keep them (the caption, if any, rides along in the format's `caption`
field). A row with neither turns nor a caption, a caption row without an image, or a caption
holding an `<image>` marker (every loader would pair it with an image that is not there) cannot be
written as a training example and is counted as not exported, with its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from warren.stages.conversation import CAPTION_WITHOUT_IMAGE, MARKER_IN_CAPTION
from warren.stages.exports.base import ExportError, SkipRow
from warren.stages.schema import IMAGE_MARKER

INSTRUCTION = "{instruction}"
DEFAULT_TEMPLATE = IMAGE_MARKER + "\n" + INSTRUCTION
# LLaVA (Liu et al. 2023), Table 8: the instructions of brief image description, the human turns
# of its caption pretraining data (LCS-558K, CC3M-595K).
LLAVA_BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
NO_TEXT = "no conversations and no caption"
BLANK_CAPTION = "no conversations and a blank caption"
# The same words as export_check (stages.conversation.caption_problem) for the same rows.
NO_IMAGE = CAPTION_WITHOUT_IMAGE
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` as typed on a command line, turned into the characters they name
    (a shell passes `"<image>\n{instruction}"` through with a backslash and an n)."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


@dataclasses.dataclass(frozen=True)
class CaptionTemplate:
    """The human turn a caption row is exported with (see the module docstring)."""

    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise ExportError(
                f"caption_template must be a string, got {type(self.template).__name__}"
            )
        markers = self.template.count(IMAGE_MARKER)
        if markers != 1:
            raise ExportError(
                f"caption_template {self.template!r} has {markers} {IMAGE_MARKER} markers; give "
                f"exactly one (it stands for the row's images), e.g. {DEFAULT_TEMPLATE!r}"
            )

    def human_turn(self, row_id: str, n_images: int) -> str:
        markers = "\n".join([IMAGE_MARKER] * n_images)
        text = self.template.replace(IMAGE_MARKER, markers)
        if INSTRUCTION in text:
            text = text.replace(INSTRUCTION, instruction_for(row_id))
        return text


def instruction_for(row_id: str) -> str:
    """One of LLaVA's brief-description instructions, chosen by the row id alone."""
    digest = hashlib.sha1(row_id.encode("utf-8", "surrogatepass")).digest()
    return LLAVA_BRIEF_INSTRUCTIONS[
        int.from_bytes(digest[:8], "big") % len(LLAVA_BRIEF_INSTRUCTIONS)
    ]


def turns_of(row: dict, template: CaptionTemplate) -> list[dict]:
    """The row's turns to export: its own conversations when it has any, else its caption as
    LLaVA's pretraining pair; SkipRow (with the reason) when it has neither."""
    turns = row.get("conversations")
    if turns:
        return [{"from": t["from"], "value": t["value"]} for t in turns]
    caption = row.get("caption")
    if caption is None:
        raise SkipRow(NO_TEXT)
    if not caption.strip():
        raise SkipRow(BLANK_CAPTION)
    n_images = len(row.get("images") or [])
    if n_images == 0:
        raise SkipRow(NO_IMAGE)
    if IMAGE_MARKER in caption:
        raise SkipRow(MARKER_IN_CAPTION)
    return [
        {"from": "human", "value": template.human_turn(row["id"], n_images)},
        {"from": "gpt", "value": caption},
    ]


def template_from(options: dict) -> CaptionTemplate:
    value = options.get("caption_template")
    return CaptionTemplate() if value is None else CaptionTemplate(value)
