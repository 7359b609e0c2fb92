"""A model's replies, checked and parsed: what every generation stage does with the text a model
or an endpoint sent back before it becomes a caption or a conversation.

`check_reply` turns a truncated, empty or refused reply, or one holding an `<image>` marker, into
`BadReply` (whose category and detail make the row's rejection reason); `parse_json_qa` reads the
JSON question/answer lists LLaVA-style prompts ask for; `to_conversations` makes them turns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from warren.stages.schema import IMAGE_MARKER

# Openings of replies that decline the task instead of doing it. Checked on the reply's start
# only: a description may well contain "I'm sorry" in a quoted sign.
_REFUSAL = re.compile(
    r"""^\W*(?:i['’]?m\s+sorry|i\s+am\s+sorry|sorry,|i\s+apologi[sz]e|as\s+an\s+ai\b
    |i\s*(?:can(?:['’]|no)?t|cannot|am\s+unable\s+to|['’]m\s+unable\s+to|am\s+not\s+able\s+to|won['’]?t)
     \s+(?:help|assist|provide|comply|do|describe|see|view|answer|fulfil|generate|write))""",
    re.IGNORECASE | re.VERBOSE,
)
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*?)\n?```\s*$", re.DOTALL)
RAW_LIMIT = 20_000  # characters of a bad reply kept in `gen_raw`: enough to see what went wrong


class BadReply(ValueError):
    """A reply that cannot become a sample; `category` and `detail` make the rejection reason."""

    def __init__(self, category: str, detail: str = "") -> None:
        super().__init__(f"{category} ({detail})" if detail else category)
        self.category = category
        self.detail = detail


def check_reply(text: str | None, finish_reason: str | None) -> str:
    """The reply's text, stripped, or BadReply for a truncated, empty or refused reply."""
    if finish_reason == "length":
        raise BadReply("truncated", "finish_reason length; raise max_tokens")
    text = (text or "").strip()
    if not text:
        raise BadReply("empty answer", f"finish_reason {finish_reason}")
    if _REFUSAL.match(text):
        raise BadReply("refused", excerpt(text))
    if IMAGE_MARKER in text:
        # The marker count must equal the number of images; a generated one would break that.
        raise BadReply("malformed answer", f"contains the {IMAGE_MARKER} marker")
    return text


def parse_json_qa(text: str) -> list[tuple[str, str]]:
    """`[{"question": ..., "answer": ...}, ...]` (optionally in a ``` fence) -> (q, a) pairs."""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadReply("malformed answer", f"not JSON: {exc}") from None
    if not isinstance(data, list):
        raise BadReply("malformed answer", f"not a JSON list but {type(data).__name__}")
    if not data:
        raise BadReply("malformed answer", "empty list")
    pairs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise BadReply("malformed answer", f"item {i} is not an object")
        for key in ("question", "answer"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                raise BadReply("malformed answer", f"item {i} has no {key!r} string")
        pairs.append((item["question"].strip(), item["answer"].strip()))
    return pairs


def to_conversations(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Alternating human/gpt turns; "<image>\\n" goes in front of the first question only."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": (f"{IMAGE_MARKER}\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def excerpt(text: str, n: int = 60) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= n else one_line[: n - 3] + "..."
