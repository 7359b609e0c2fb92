"""eval_tasks: benchmark files, as their authors publish them, read into items to ask a model.

Each task reads a folder (`warren eval --data ROOT` looks for ROOT/<task>/, or `--data
TASK=FOLDER`) holding the benchmark's own files; images are found by name anywhere under it:

| task | files | images |
|---|---|---|
| vqav2 | `*questions*.json` and `*annotations*.json` (VQAv2's) | `COCO_<subtype>_<id:012>.jpg` |
| gqa | `*questions*.json` (e.g. testdev_balanced_questions.json) | `<imageId>.jpg` |
| textvqa | `TextVQA_<version>_*.json` (`{"data": [...]}`); OCR tokens from the questions or `TextVQA_Rosetta_OCR_*.json` when there | `<image_id>.jpg` |
| vizwiz | `val.json` (or one `*.json`: a list with `answers`) | by `image` |
| pope | `*pope*.json` (JSON lines; the file's last `_` part is the split) | by `image` |
| scienceqa | `problems.json` (the test split, problems with an image) | `<split>/<pid>/image.png` |
| mmbench | one `*.tsv` (images inline, base64) | |
| seedbench | `SEED-Bench*.json` (image questions) | by `data_id` |
| coco_caption, nocaps, flickr30k | COCO captions JSON (`images`, `annotations`) or Karpathy's `dataset_*.json` (its test split) | by file name |

Prompts are LLaVA-1.5's evaluation prompts: the short-answer instruction after open questions,
option letters and "Answer with the option's letter from the given choices directly." after
multiple choice, VizWiz's instruction to answer "Unanswerable", and lmms-eval's caption prompt.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from warren.trainers.eval_metrics import LETTERS, rotations

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
CAPTION = "Provide a one-sentence caption for the provided image."
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class TaskDataError(ValueError):
    """A task's files are missing, ambiguous or not in the published format."""


@dataclass(frozen=True)
class EvalItem:
    """One question to ask. `image` is a file path or the encoded bytes (None: not found, the
    item is reported and not asked). `answers`: the human answers (VQA), the answer, "yes"/"no"
    (POPE), the right letter (multiple choice), or the reference captions. `group`: the
    question the item is a rotation of (MMBench's circular evaluation)."""

    id: str
    image: str | bytes | None
    prompt: str
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    category: str = ""
    group: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # vqa, gqa, pope, choice, caption: how predictions are scored
    load: Callable[[Path, int | None], list[EvalItem]]
    max_new_tokens: int


class _Images:
    """The image files under a folder, by name (walked once)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_name: dict[str, str] = {}
        for root, _, files in os.walk(folder):
            for f in files:
                if Path(f).suffix.lower() in _IMAGE_SUFFIXES:
                    self.by_name.setdefault(f, os.path.join(root, f))

    def find(self, *names: str) -> str | None:
        for name in names:
            if "/" in name and (self.folder / name).is_file():
                return str(self.folder / name)
            hit = self.by_name.get(os.path.basename(name))
            if hit is not None:
                return hit
        return None


def _one(folder: Path, *patterns: str) -> Path:
    for pattern in patterns:
        hits = sorted({*folder.glob(pattern), *folder.glob(f"*/{pattern}")})
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise TaskDataError(
                f"{folder}: {len(hits)} files match {pattern!r} ({', '.join(h.name for h in hits)});"
                " point --data TASK=FOLDER at a folder holding one"
            )
    raise TaskDataError(f"{folder}: no file matches {' or '.join(map(repr, patterns))}")


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path}: not JSON ({exc})") from exc


def _key(path: Path, record: object, key: str) -> object:
    if not isinstance(record, dict) or key not in record:
        raise TaskDataError(f"{path}: a record lacks {key!r}: {str(record)[:200]}")
    return record[key]


def _first(items: Iterator[EvalItem], limit: int | None) -> list[EvalItem]:
    out = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


def _short(question: str) -> str:
    return f"{question.strip()}\n{SHORT_ANSWER}"


def _choices(question: str, options: list[str], hint: str = "", context: str = "") -> str:
    lines = [f"{context}{hint.strip()}"] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    lines.append(OPTION_LETTER)
    return "\n".join(lines)


# --- open answers ---------------------------------------------------------------------------


def load_vqav2(folder: Path, limit: int | None) -> list[EvalItem]:
    qpath = _one(folder, "*questions*.json")
    apath = _one(folder, "*annotations*.json")
    questions = _json(qpath)
    subtype = questions.get("data_subtype", "val2014") if isinstance(questions, dict) else ""
    annotations = {
        _key(apath, a, "question_id"): a for a in _key(apath, _json(apath), "annotations")
    }
    images = _Images(folder)

    def items() -> Iterator[EvalItem]:
        for q in _key(qpath, questions, "questions"):
            qid = _key(qpath, q, "question_id")
            ann = annotations.get(qid)
            if ann is None:
                raise TaskDataError(f"{apath}: no annotation for question {qid}")
            image_id = int(_key(qpath, q, "image_id"))
            yield EvalItem(
                id=str(qid),
                image=images.find(f"COCO_{subtype}_{image_id:012d}.jpg", f"{image_id:012d}.jpg"),
                prompt=_short(_key(qpath, q, "question")),
                answers=tuple(a["answer"] for a in _key(apath, ann, "answers")),
                category=str(ann.get("answer_type", "")),
            )

    return _first(items(), limit)


def load_gqa(folder: Path, limit: int | None) -> list[EvalItem]:
    path = _one(folder, "*questions*.json")
    questions = _json(path)
    if not isinstance(questions, dict):
        raise TaskDataError(f"{path}: expected GQA's object of questions by id")
    images = _Images(folder)
    items = (
        EvalItem(
            id=str(qid),
            image=images.find(f"{_key(path, q, 'imageId')}.jpg"),
            prompt=_short(_key(path, q, "question")),
            answers=(str(_key(path, q, "answer")),),
            category=str((q.get("types") or {}).get("structural", "")),
        )
        for qid, q in questions.items()
    )
    return _first(items, limit)


def load_textvqa(folder: Path, limit: int | None) -> list[EvalItem]:
    """TextVQA's questions; the OCR tokens of each image (a question's own `ocr_tokens`, or
    the Rosetta OCR file TextVQA publishes beside them) go in the prompt as LLaVA-1.5's
    evaluation puts them: "Reference OCR token: a, b, c"."""
    path = _one(folder, "TextVQA_[0-9]*.json", "*textvqa*.json")
    ocr: dict[str, list[str]] = {}
    rosetta = sorted(folder.rglob("*Rosetta_OCR*.json"))
    if len(rosetta) > 1:
        raise TaskDataError(f"{folder}: {len(rosetta)} Rosetta OCR files; keep the split's one")
    for record in _key(rosetta[0], _json(rosetta[0]), "data") if rosetta else []:
        ocr[str(_key(rosetta[0], record, "image_id"))] = list(record.get("ocr_tokens") or [])
    images = _Images(folder)

    def prompt(q: dict) -> str:
        question = str(_key(path, q, "question")).strip()
        tokens = q.get("ocr_tokens", ocr.get(str(q["image_id"])))
        reference = f"\nReference OCR token: {', '.join(map(str, tokens))}" if tokens else ""
        return f"{question}{reference}\n{SHORT_ANSWER}"

    items = (
        EvalItem(
            id=str(_key(path, q, "question_id")),
            image=images.find(f"{_key(path, q, 'image_id')}.jpg"),
            prompt=prompt(q),
            answers=tuple(_key(path, q, "answers")),
        )
        for q in _key(path, _json(path), "data")
    )
    return _first(items, limit)


def load_vizwiz(folder: Path, limit: int | None) -> list[EvalItem]:
    path = _one(folder, "val.json", "*.json")
    records = _json(path)
    if not isinstance(records, list):
        raise TaskDataError(f"{path}: expected VizWiz's list of questions")
    images = _Images(folder)
    items = (
        EvalItem(
            id=str(_key(path, q, "image")),
            image=images.find(str(q["image"])),
            prompt=f"{str(_key(path, q, 'question')).strip()}\n{UNANSWERABLE}\n{SHORT_ANSWER}",
            answers=tuple(a["answer"] for a in _key(path, q, "answers")),
            category=str(q.get("answer_type", "")),
        )
        for q in records
    )
    return _first(items, limit)


# --- POPE -----------------------------------------------------------------------------------


def load_pope(folder: Path, limit: int | None) -> list[EvalItem]:
    files = sorted({*folder.glob("*pope*.json"), *folder.glob("*/*pope*.json")})
    if not files:
        raise TaskDataError(f"{folder}: no POPE file (*pope*.json)")
    images = _Images(folder)
    out: list[EvalItem] = []
    for path in files:
        split = path.stem.rsplit("_", 1)[-1]
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}:{n}: not a JSON line ({exc})") from exc
        items = (
            EvalItem(
                id=f"{split}-{_key(path, r, 'question_id')}",
                image=images.find(str(_key(path, r, "image"))),
                prompt=_short(_key(path, r, "text")),
                answers=(str(_key(path, r, "label")).strip().lower(),),
                category=split,
            )
            for r in rows
        )
        out += _first(items, limit)
    return out


# --- multiple choice ------------------------------------------------------------------------


def load_scienceqa(folder: Path, limit: int | None) -> list[EvalItem]:
    path = _one(folder, "problems.json")
    problems = _json(path)
    if not isinstance(problems, dict):
        raise TaskDataError(f"{path}: expected ScienceQA's object of problems by id")
    images = _Images(folder)

    def items() -> Iterator[EvalItem]:
        for pid, p in problems.items():
            if p.get("split") != "test" or not p.get("image"):
                continue  # ScienceQA-IMG: the test problems that come with an image
            options = [str(c) for c in _key(path, p, "choices")]
            yield EvalItem(
                id=str(pid),
                image=images.find(f"test/{pid}/{p['image']}", f"images/test/{pid}/{p['image']}"),
                prompt=_choices(str(p["question"]), options, p.get("hint") or "", "Context: "),
                answers=(LETTERS[int(_key(path, p, "answer"))],),
                options=tuple(options),
                category=str(p.get("subject", "")),
            )

    return _first(items(), limit)


def load_mmbench(folder: Path, limit: int | None) -> list[EvalItem]:
    path = _one(folder, "*.tsv")
    csv.field_size_limit(sys.maxsize)  # images are inline
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and "answer" not in rows[0]:
        raise TaskDataError(f"{path}: no 'answer' column (a test split?); evaluate the dev split")
    out: list[EvalItem] = []
    for row in rows[:limit] if limit is not None else rows:
        options = [row[k] for k in LETTERS[:4] if row.get(k) and row[k].strip() and row[k] != "nan"]
        answer = LETTERS.index(_key(path, row, "answer").strip())
        image = base64.b64decode(_key(path, row, "image"))
        hint = row.get("hint") or ""
        for shift, (shown, right) in enumerate(rotations(options, answer)):
            out.append(
                EvalItem(
                    id=f"{row['index']}-r{shift}",
                    image=image,
                    prompt=_choices(row["question"], shown, "" if hint == "nan" else hint),
                    answers=(LETTERS[right],),
                    options=tuple(shown),
                    category=row.get("category", ""),
                    group=str(row["index"]),
                )
            )
    return out


def load_seedbench(folder: Path, limit: int | None) -> list[EvalItem]:
    path = _one(folder, "SEED-Bench*.json")
    data = _json(path)
    types = {v: k for k, v in (data.get("question_type") or {}).items()}
    images = _Images(folder)
    items = (
        EvalItem(
            id=str(_key(path, q, "question_id")),
            image=images.find(str(q["data_id"]), f"{_key(path, q, 'data_id')}.jpg"),
            prompt=_choices(str(q["question"]), options := [q[f"choice_{c}"] for c in "abcd"]),
            answers=(str(_key(path, q, "answer")).strip(),),
            options=tuple(options),
            category=str(types.get(q.get("question_type_id"), q.get("question_type_id", ""))),
        )
        for q in _key(path, data, "questions")
        if q.get("data_type", "image") == "image"
    )
    return _first(items, limit)


# --- captions -------------------------------------------------------------------------------


def load_captions(folder: Path, limit: int | None) -> list[EvalItem]:
    path = _one(folder, "*captions*.json", "dataset_*.json", "*.json")
    data = _json(path)
    images = _Images(folder)
    listed = _key(path, data, "images")
    if "annotations" in data:  # COCO format
        refs: dict[object, list[str]] = {}
        for a in data["annotations"]:
            refs.setdefault(_key(path, a, "image_id"), []).append(str(a["caption"]))
        pairs = [(str(i["id"]), str(i["file_name"]), refs.get(i["id"], [])) for i in listed]
    else:  # Karpathy's split files
        test = [i for i in listed if i.get("split") == "test"] or listed
        pairs = [
            (
                str(i.get("imgid", i["filename"])),
                str(i["filename"]),
                [s["raw"] for s in i["sentences"]],
            )
            for i in test
        ]
    items = (
        EvalItem(id=key, image=images.find(name), prompt=CAPTION, answers=tuple(refs))
        for key, name, refs in pairs
        if refs
    )
    return _first(items, limit)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("vqav2", "vqa", load_vqav2, 16),
        Task("gqa", "gqa", load_gqa, 16),
        Task("textvqa", "vqa", load_textvqa, 16),
        Task("vizwiz", "vqa", load_vizwiz, 16),
        Task("pope", "pope", load_pope, 16),
        Task("scienceqa", "choice", load_scienceqa, 8),
        Task("mmbench", "choice", load_mmbench, 8),
        Task("seedbench", "choice", load_seedbench, 8),
        Task("coco_caption", "caption", load_captions, 64),
        Task("nocaps", "caption", load_captions, 64),
        Task("flickr30k", "caption", load_captions, 64),
    )
}
