"""short_answer: the short-answer instruction LLaVA-1.5 and Cambrian add to VQA-style turns.

Academic VQA data (VQAv2, GQA, OCR-VQA, ...) answers in a word or two; trained on it as is, a
model learns to answer everything tersely. LLaVA-1.5 (and Cambrian after it) append "Answer the
question using a single word or phrase." to those questions, so the model learns when a short
answer is asked for. This stage applies that rule to the rows it selects:

- a question (a `human` turn) gets `"\\n" + instruction` appended when the `gpt` turn right after
  it answers in at most `max_words` words (split on whitespace);
- only rows whose `source` is in `sources` (comma-separated; empty = every row);
- a question that already ends with the instruction is left alone, so re-running the stage
  changes nothing; the `<image>` marker stays where it was (the text is appended at the end).

Writes `short_answer_turns` (int32): the questions changed in the row. Rejects no row.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from warren.stages.base import BatchStage, param, put_column
from warren.stages.schema import KNOWN_TYPES

LLAVA_SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class ShortAnswerParams:
    instruction: str = param(LLAVA_SHORT_ANSWER, "Text appended to questions with short answers.")
    max_words: int = param(3, "Answers of at most this many words count as short.")
    sources: str = param("", "Comma-separated sources the rule applies to ('' = every row).")


def add_instruction(
    turns: list[dict[str, str]] | None, instruction: str, max_words: int
) -> tuple[list[dict[str, str]] | None, int]:
    """The conversation with the instruction after each question whose answer is short, and how
    many questions changed."""
    if not turns:
        return turns, 0
    out = [dict(t) for t in turns]
    changed = 0
    for q, a in zip(out, out[1:], strict=False):
        if q.get("from") != "human" or a.get("from") != "gpt":
            continue
        question = q.get("value") or ""
        if len((a.get("value") or "").split()) > max_words or question.rstrip().endswith(
            instruction
        ):
            continue
        q["value"] = f"{question.rstrip()}\n{instruction}"
        changed += 1
    return out, changed


class ShortAnswer(BatchStage):
    """Append the short-answer instruction to questions whose answers are a word or phrase."""

    name = "short_answer"
    version = "1"
    Params = ShortAnswerParams
    adds = ("short_answer_turns",)

    def check_params(self) -> None:
        if not self.params.instruction.strip():
            raise ValueError(f"{self.name}: instruction must not be empty")
        if self.params.max_words < 1:
            raise ValueError(f"{self.name}: max_words must be >= 1")

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        n = batch.num_rows
        if "conversations" not in batch.column_names:
            return put_column(batch, "short_answer_turns", pa.array([0] * n, pa.int32()))
        wanted = {s.strip() for s in p.sources.split(",") if s.strip()}
        sources = (
            batch.column("source").to_pylist() if "source" in batch.column_names else [None] * n
        )
        conversations = batch.column("conversations").to_pylist()
        counts = [0] * n
        for i in range(n):
            if wanted and sources[i] not in wanted:
                continue
            conversations[i], counts[i] = add_instruction(
                conversations[i], p.instruction.strip(), p.max_words
            )
        out = put_column(
            batch, "conversations", pa.array(conversations, KNOWN_TYPES["conversations"])
        )
        return put_column(out, "short_answer_turns", pa.array(counts, pa.int32()))


__all__ = ["LLAVA_SHORT_ANSWER", "ShortAnswer", "ShortAnswerParams", "add_instruction"]
