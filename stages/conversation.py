"""The one definition of a valid conversation, used by the readers at ingest and by export_check.

A conversation is LLaVA's list of turns `[{"from": ..., "value": ...}, ...]`. It is valid when:

- every role is `human`, `gpt` or `system` (after the aliases below);
- an optional single `system` turn comes first, then `human` and `gpt` alternate, starting with
  `human` and ending with `gpt` (a conversation that starts with the model's turn has no
  question to learn from, and the loaders of LLaVA and LLaMA-Factory misalign it);
- every value is a string holding more than whitespace;
- the `<image>` markers over all turns equal the number of images (each loader pairs the k-th
  marker with the k-th image).

`normalize` makes the automatic edits a reader is allowed to make, and records each one as a line
on the row's `edits` column (schema.EDITS_COLUMN), so nothing is changed without a trace:

- a role alias becomes its LLaVA name: `human`, `user` -> `human`; `gpt`, `assistant`, `model`
  (Gemini), `chatgpt` (ShareGPT dumps) -> `gpt`; `system` stays `system`. Case and surrounding
  whitespace do not matter (`" USER "` -> `human`). `bot`, `observation`, `function` and any other
  role are unknown: LLaVA has no such turn, and guessing who spoke would be wrong.
- with images and no `<image>` marker at all, one `"<image>\\n"` per image is put in front of the
  first human turn (LLaVA's convention). Any other marker mismatch is a rejection.

Turn text is never edited otherwise (LLaVA's values carry meaningful newlines).

A caption row (no turns, a non-empty caption without `<image>`, exactly one image) is valid too: the exports write
it in LLaVA's pretraining form (one human turn holding the marker, one model turn the caption).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from warren.stages.schema import IMAGE_MARKER

HUMAN, GPT, SYSTEM = "human", "gpt", "system"
ROLES = (HUMAN, GPT, SYSTEM)
# Lower-cased, stripped role -> LLaVA role. ShareGPT/LLaVA use human/gpt, OpenAI/TRL/LLaMA-Factory
# user/assistant, Gemini user/model; some ShareGPT dumps write chatgpt.
ROLE_ALIASES: dict[str, str] = {
    "human": HUMAN,
    "user": HUMAN,
    "gpt": GPT,
    "assistant": GPT,
    "model": GPT,
    "chatgpt": GPT,
    "system": SYSTEM,
}


def canonical_role(role: Any) -> str | None:
    """The LLaVA role for `role` (any case, stray whitespace), or None when it is not known."""
    if not isinstance(role, str):
        return None
    return ROLE_ALIASES.get(role.strip().lower())


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def normalize(
    turns: Sequence[Mapping[str, Any]] | None, n_images: int
) -> tuple[list[dict] | None, list[str]]:
    """(turns with roles renamed and markers inserted, the edits made); the input is not changed.

    Unknown roles and non-string values are left as they are for `problem` to name.
    """
    if turns is None:
        return None, []
    out: list[dict] = []
    edits: list[str] = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, Mapping):  # a null turn: left for `problem` to name
            out.append(turn)
            continue
        role, value = turn.get("from"), turn.get("value")
        name = canonical_role(role)
        if name is not None and name != role:
            edits.append(f"role {role!r} -> {name!r} (turn {i})")
            role = name
        out.append({"from": role, "value": value})
    if n_images and count_markers(out) == 0:
        first = next(
            (
                k
                for k, t in enumerate(out)
                if isinstance(t, Mapping) and t["from"] == HUMAN and isinstance(t["value"], str)
            ),
            None,
        )
        if first is not None:
            out[first]["value"] = (IMAGE_MARKER + "\n") * n_images + out[first]["value"]
            what = IMAGE_MARKER if n_images == 1 else f"{n_images} x {IMAGE_MARKER}"
            edits.append(f"inserted {what} in turn {first + 1}")
    return out, edits


def count_markers(turns: Sequence[Mapping[str, Any]] | None) -> int:
    return sum(
        t["value"].count(IMAGE_MARKER)
        for t in turns or []
        if isinstance(t, Mapping) and isinstance(t.get("value"), str)
    )


def problem(turns: Sequence[Mapping[str, Any]] | None, n_images: int) -> str | None:
    """Why `turns` (already normalised) with `n_images` images is not a valid conversation, or None.

    The reasons, for the first rule broken: `no turns`, `malformed turn (turn 2 is null)`,
    `unknown role (turn 3 is 'bot')`,
    `empty turn (turn 2, 'gpt')`, `starts with the model's turn (turn 1 is 'gpt')`,
    `turns do not alternate (turn 3 is 'system', expected 'human')`,
    `turns do not alternate (ends with 'human', expected 'gpt')`,
    `image marker mismatch (2 markers, 1 images)`.
    """
    if not turns:
        return "no turns"
    expected = HUMAN
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, Mapping):
            return f"malformed turn (turn {i} is {_type_name(turn)})"
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            return f"unknown role (turn {i} is {role!r})"
        if not isinstance(value, str) or not value.strip():
            return f"empty turn (turn {i}, {role!r})"
    body = list(turns[1:] if turns[0].get("from") == SYSTEM else turns)
    offset = len(turns) - len(body)
    if not body:
        return "turns do not alternate (no human/gpt turns)"
    if body[0]["from"] == GPT:
        return f"starts with the model's turn (turn {offset + 1} is 'gpt')"
    for i, turn in enumerate(body, offset + 1):
        if turn["from"] != expected:
            return f"turns do not alternate (turn {i} is {turn['from']!r}, expected {expected!r})"
        expected = GPT if expected == HUMAN else HUMAN
    if expected != HUMAN:
        return f"turns do not alternate (ends with 'human', expected {expected!r})"
    markers = count_markers(turns)
    if markers != n_images:
        return f"image marker mismatch ({markers} markers, {n_images} images)"
    return None


CAPTION_WITHOUT_IMAGE = "caption row without an image"
MARKER_IN_CAPTION = f"caption holds an {IMAGE_MARKER} marker (it would pair with no image)"


def caption_problem(caption: Any, n_images: int) -> str | None:
    """Why a row without turns is not a valid caption row, or None. A caption row is exported as
    LLaVA's pretraining pair (stages.exports.caption): it needs its one image and a caption that
    holds no image marker of its own."""
    if not isinstance(caption, str) or not caption.strip():
        return "no conversations and no caption"
    if n_images == 0:
        return CAPTION_WITHOUT_IMAGE
    if n_images > 1:
        return f"caption row with {n_images} images (a caption describes one image)"
    if IMAGE_MARKER in caption:
        return MARKER_IN_CAPTION
    return None


def row_problem(
    turns: Sequence[Mapping[str, Any]] | None, caption: Any, n_images: int
) -> str | None:
    """The verdict on a whole row: its conversation when it has turns, else its caption."""
    if turns:
        return problem(turns, n_images)
    return caption_problem(caption, n_images)


__all__ = [
    "GPT",
    "HUMAN",
    "ROLES",
    "ROLE_ALIASES",
    "SYSTEM",
    "canonical_role",
    "caption_problem",
    "count_markers",
    "normalize",
    "problem",
    "row_problem",
]
