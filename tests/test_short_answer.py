"""The short-answer instruction: hand-worked conversations, the word limit at and around it,
the source filter, and idempotence."""

from __future__ import annotations

import pytest

from warren.stages.schema import count_image_markers, rows_to_table
from warren.stages.short_answer import LLAVA_SHORT_ANSWER, ShortAnswer

INSTR = LLAVA_SHORT_ANSWER


def conv(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    turns = []
    for q, a in pairs:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


def run(rows: list[dict], **params) -> list[dict]:
    return ShortAnswer(**params).process(rows_to_table(rows)).to_pylist()


def test_questions_with_short_answers_get_the_instruction_and_long_ones_do_not() -> None:
    rows = [
        {
            "id": "vqa",
            "source": "vqav2",
            "conversations": conv(
                ("<image>\nWhat colour is the bus?", "Red"),
                ("How many people are waiting?  ", "three people waiting"),  # 3 words: short
                ("What is the weather like?", "It looks cold and wet"),  # 5 words: long
            ),
        }
    ]
    (out,) = run(rows)
    assert out["conversations"] == conv(
        (f"<image>\nWhat colour is the bus?\n{INSTR}", "Red"),
        (f"How many people are waiting?\n{INSTR}", "three people waiting"),
        ("What is the weather like?", "It looks cold and wet"),
    )
    assert out["short_answer_turns"] == 2
    assert count_image_markers(out["conversations"]) == 1


@pytest.mark.parametrize(("answer", "short"), [("a b", True), ("a b c", True), ("a b c d", False)])
def test_the_word_limit_is_inclusive(answer: str, short: bool) -> None:
    (out,) = run([{"id": "r", "conversations": conv(("Q?", answer))}], max_words=3)
    assert out["short_answer_turns"] == int(short)
    assert out["conversations"][0]["value"] == (f"Q?\n{INSTR}" if short else "Q?")


def test_only_the_listed_sources_change_and_a_second_run_changes_nothing() -> None:
    rows = [
        {"id": "a", "source": "gqa", "conversations": conv(("Q?", "yes"))},
        {"id": "b", "source": "llava_158k", "conversations": conv(("Q?", "no"))},
        {"id": "c", "source": None, "conversations": None},
    ]
    once = run(rows, sources="gqa, vqav2")
    assert [r["short_answer_turns"] for r in once] == [1, 0, 0]
    assert once[1]["conversations"] == rows[1]["conversations"]
    assert once[2]["conversations"] is None
    twice = run(once, sources="gqa, vqav2")
    assert [r["conversations"] for r in twice] == [r["conversations"] for r in once]
    assert [r["short_answer_turns"] for r in twice] == [0, 0, 0]


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="max_words"):
        ShortAnswer(max_words=0)
    with pytest.raises(ValueError, match="instruction"):
        ShortAnswer(instruction="  ")
