"""The evaluation metrics against values worked out by hand, and CIDEr-D against a direct
computation of its definition (Vedantam et al., with the COCO evaluation's choices: n-grams up to
4, idf from the references' document frequencies, clipping, a Gaussian length penalty with
sigma 6, times 10)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from warren.trainers.eval_metrics import (
    choice_letter,
    cider,
    gqa_match,
    normalize_vqa_answer,
    pope_answer,
    pope_metrics,
    rotations,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("The Red Car", "red car"),  # lower case, article dropped
        ("yes, it is", "yes it is"),  # a comma before a space is deleted
        ("black/white", "black white"),  # a slash inside a word separates
        ("1,000", "1000"),  # digit-comma-digit: marks are deleted, not spaced
        ("2.5", "2.5"),  # a period before a digit stays
        ("dont know!", "don't know"),  # contraction restored, "!" dropped
        ("  Blue\n", "blue"),
        ("none", "0"),
    ],
)
def test_vqa_normalisation_follows_the_official_rules(raw, normal):
    assert normalize_vqa_answer(raw) == normal


def test_vqa_accuracy_averages_min_1_matches_over_3_over_each_left_out_answer():
    answers = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    # "2" (3 of 10 after normalisation): leaving out one of its own gives 2 matches (2/3),
    # leaving out one of the seven others gives 3 (1): (3 * 2/3 + 7 * 1) / 10.
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("four", answers) == 0.0
    # One human said it: 0 when it is left out, 1/3 the nine other times.
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_gqa_is_an_exact_match_without_case_or_a_final_period():
    assert gqa_match("Left.", "left") == 1.0
    assert gqa_match("on the left", "left") == 0.0


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("There is not a dog.", "no"),
        ("Yes. No cats are visible though.", "yes"),  # only the first sentence counts
        ("no", "no"),
        ("Nope", "yes"),  # LLaVA's reading, which knows only no, No and not
    ],
)
def test_pope_reads_yes_or_no_as_llava_does(text, answer):
    assert pope_answer(text) == answer


def test_pope_metrics_count_yes_as_the_positive_class():
    got = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # tp 2 (first, last), fp 1, tn 1, fn 1.
    assert got == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6}
    )
    assert pope_metrics(["no"], ["yes"])["precision"] == 0.0  # no yes at all: not a crash


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) a cat", "C"),
        ("D. a dog", "D"),
        ("The answer is A.", "A"),
        ("a dog", "D"),  # the text of one option
        ("E", None),  # not one of the four options
        ("I think so", None),
        ("", None),
    ],
)
def test_an_option_letter_is_read_from_the_forms_models_answer_in(text, letter):
    assert choice_letter(text, ["a cat", "a bird", "a cow", "a dog"]) == letter


def test_circular_rotations_move_the_right_answer_with_its_option():
    got = rotations(["a", "b", "c", "d"], answer=2)
    assert got == [
        (["a", "b", "c", "d"], 2),
        (["b", "c", "d", "a"], 1),
        (["c", "d", "a", "b"], 0),
        (["d", "a", "b", "c"], 3),
    ]


def _cider_d(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """CIDEr-D from its definition, for captions already lower-case and without punctuation."""

    def grams(text: str, n: int) -> Counter:
        words = text.split()
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    log_images = math.log(len(references))
    df = [Counter() for _ in range(5)]
    for refs in references.values():
        for n in range(1, 5):
            df[n].update({g for r in refs for g in grams(r, n)})

    def tfidf(text: str, n: int) -> dict[tuple, float]:
        return {
            g: c * (log_images - math.log(max(1.0, df[n][g]))) for g, c in grams(text, n).items()
        }

    scores = {}
    for key, hyp in predictions.items():
        total = 0.0
        for n in range(1, 5):
            h = tfidf(hyp, n)
            for ref in references[key]:
                r = tfidf(ref, n)
                norm = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(
                    sum(v * v for v in r.values())
                )
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items())
                delta = len(hyp.split()) - len(ref.split())
                sim = dot / norm if norm else 0.0
                total += sim * math.exp(-(delta**2) / (2 * 6.0**2))
        scores[key] = 10 * total / 4 / len(references[key])
    return scores


def test_cider_is_the_coco_evaluations_cider_d():
    references = {
        "1": ["a dog runs on the grass", "a brown dog running in a field"],
        "2": ["two cats sleep on a sofa", "cats sleeping on the couch together"],
        "3": ["a man rides a red bicycle", "a person on a bike in the street"],
    }
    predictions = {
        "1": "a dog running on the grass",
        "2": "two cats on a sofa",
        "3": "a plate of food",
    }
    expected = _cider_d(predictions, references)
    corpus, per_item = cider(predictions, references)
    assert per_item == pytest.approx(expected)
    assert corpus == pytest.approx(sum(expected.values()) / 3)
    assert per_item["3"] < 0.1 < per_item["2"] < per_item["1"]
    # The PTB tokenizer lower-cases and drops punctuation before counting.
    assert cider({"1": "A dog running, on the grass."}, {"1": references["1"]})[0] == pytest.approx(
        cider({"1": "a dog running on the grass"}, {"1": references["1"]})[0]
    )
