"""eval_metrics: the scores `warren eval` reports, each as its benchmark's evaluator computes it.

- Open answers (VQAv2, TextVQA, VizWiz): the VQA answer normalisation (punctuation, number
  words to digits, articles dropped, contractions restored) on the prediction and on each of the
  human answers, then the VQA accuracy: `min(1, matches / 3)` against each leave-one-out subset
  of the human answers, averaged. This is how the TextVQA evaluator (and lmms-eval) computes
  it; the official VQAv2 server skips the normalisation of the human answers when they all agree
  (they are then already in normal form in the published annotations).
- GQA: exact match of the prediction, lower-cased and without a final period, with the answer.
- POPE: the prediction read as yes or no as LLaVA's `eval_pope` reads it (a "no", "No" or "not"
  in the first sentence is a no), then accuracy, precision, recall and F1 of "yes", and the share
  of yes answers.
- Multiple choice (ScienceQA-IMG, MMBench, SEED-Bench): the option letter read from the
  prediction; an unreadable prediction is wrong. MMBench's circular evaluation asks a question
  once per rotation of its options and counts it right only when every rotation is.
- Captions (COCO, NoCaps, Flickr30k): CIDEr-D from pycocoevalcap after its PTB tokenizer, the
  COCO caption evaluation's code (the tokenizer runs Java).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

# The VQA evaluation's normalisation tables (VQA/PythonEvaluationTools/vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
]  # fmt: skip
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern, typo and all: "(?!<=" is a lookahead for the text "<=", not the intended
# lookbehind, so a period is dropped unless a digit follows it ("2.5" keeps its point).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """An answer in the VQA evaluation's normal form: "Two dogs." -> "2 dogs"."""
    original = text.replace("\n", " ").replace("\t", " ").strip()
    text = original
    for p in _PUNCTUATION:
        # A mark next to a space in the original, or any mark when the original has a
        # digit-comma-digit, is deleted; elsewhere it separates words.
        if p + " " in original or " " + p in original or _DIGIT_COMMA.search(original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2, TextVQA and
    VizWiz): the mean over each answer left out of `min(1, matches among the rest / 3)`."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gold = [normalize_vqa_answer(a) for a in answers]
    total = 0.0
    for left_out in range(len(gold)):
        matches = sum(1 for j, a in enumerate(gold) if j != left_out and a == pred)
        total += min(1.0, matches / 3)
    return total / len(gold)


def gqa_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction, lower-cased and without a final period, is the answer."""
    return float(prediction.strip().rstrip(".").strip().lower() == answer.strip().lower())


def pope_answer(prediction: str) -> str:
    """ "yes" or "no", as LLaVA's eval_pope reads a free-form answer."""
    first = prediction.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of "yes" (the object is there), and the share of yes
    answers, over yes/no predictions and labels."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("pope_metrics needs as many predictions as labels, at least one")
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs),
    }


LETTERS = "ABCDEFGHIJ"
_LEADING_LETTER = re.compile(r"^\(?([A-J])(?:[).:]|\s|$)")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-J])\b", re.IGNORECASE)


def choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a prediction names, or None when it names none: "B", "B.", "(B)",
    "B. a cat", "The answer is B", or the text of exactly one option."""
    text = prediction.strip()
    valid = LETTERS[: len(options)]
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        m = pattern.search(text)
        if m and m.group(1) in valid:
            return m.group(1)
    said = text.rstrip(".").strip().lower()
    hits = [LETTERS[i] for i, o in enumerate(options) if o.strip().rstrip(".").lower() == said]
    return hits[0] if len(hits) == 1 else None


def rotations(options: Sequence[str], answer: int) -> list[tuple[list[str], int]]:
    """MMBench's circular evaluation: the options shifted by 0, 1, ... len - 1 places, each with
    the index of the right one."""
    n = len(options)
    return [
        ([options[(i + shift) % n] for i in range(n)], (answer - shift) % n) for shift in range(n)
    ]


def cider(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[float, dict[str, float]]:
    """CIDEr-D of the predictions (one caption an item) against their references, through
    pycocoevalcap's PTB tokenizer and scorer: (corpus score, score per item). Document
    frequencies come from these references, as in the COCO evaluation."""
    if set(predictions) != set(references) or not predictions:
        raise ValueError("cider needs a prediction and references for the same items, at least one")
    require_java()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = sorted(predictions)
    index = {k: i for i, k in enumerate(keys)}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({index[k]: [{"caption": c} for c in references[k]] for k in keys})
    res = tokenizer.tokenize({index[k]: [{"caption": predictions[k]}] for k in keys})
    score, per_item = Cider().compute_score(gts, res)
    return float(score), {k: float(per_item[index[k]]) for k in keys}


def require_java() -> None:
    """CIDEr's tokenizer is the Stanford PTB tokenizer, a Java program shipped in pycocoevalcap."""
    if shutil.which("java") is None:
        raise ValueError(
            "caption tasks score CIDEr with pycocoevalcap, whose PTB tokenizer runs Java; no "
            "`java` is on PATH (Debian: apt-get install -y default-jre-headless)"
        )
