"""`warren eval`: each benchmark's published file format read from tiny files written here, the
prompts LLaVA-1.5 evaluates with, and metrics worked out by hand from scripted answers; then the
two real ways of asking, a checkpoint in-process and a served model through a chat endpoint."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_chat_server import FakeChatServer
from PIL import Image
from test_eval_metrics import _cider_d

from warren.pipelines.cli import main as cli
from warren.trainers.eval_tasks import OPTION_LETTER, SHORT_ANSWER, UNANSWERABLE, EvalItem
from warren.trainers.evaluate import evaluate


class Scripted:
    """A backend answering each item with `fn(item)`; records what it was asked."""

    def __init__(self, fn: Callable[[EvalItem], str | None]):
        self.fn = fn
        self.asked: list[EvalItem] = []

    def answer(self, items, max_new_tokens):
        self.asked += items
        return [self.fn(i) for i in items]


def image(path: Path, color=(200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), color).save(path, format=fmt)
    return path


def png_bytes(color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def run(
    tmp_path: Path, task: str, answers: dict[str, str] | Callable, **kw
) -> tuple[dict, Scripted]:
    fn = answers if callable(answers) else (lambda item: answers[item.id])
    backend = Scripted(fn)
    results = evaluate(
        None, [task], [str(tmp_path / "data")], str(tmp_path / "out"), backend=backend, **kw
    )
    return results["tasks"][task], backend


def predictions(tmp_path: Path, task: str) -> list[dict]:
    lines = (tmp_path / "out" / "predictions" / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_vqav2_scores_vqa_accuracy_and_reports_a_question_without_its_image(tmp_path):
    root = tmp_path / "data" / "vqav2"
    questions = [
        {"image_id": 1, "question": "How many dogs?", "question_id": 10},
        {"image_id": 2, "question": "What color is it?", "question_id": 20},
        {"image_id": 3, "question": "Where is it?", "question_id": 30},
    ]
    write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"data_subtype": "val2014", "questions": questions},
    )
    answers = {
        10: (["2", "2", "two"] + ["3"] * 7, "number"),
        20: (["red"] * 10, "other"),
        30: (["home"] * 10, "other"),
    }
    write_json(
        root / "v2_mscoco_val2014_annotations.json",
        {
            "annotations": [
                {"question_id": q, "answers": [{"answer": a} for a in ans], "answer_type": t}
                for q, (ans, t) in answers.items()
            ]
        },
    )
    image(root / "val2014" / "COCO_val2014_000000000001.jpg")
    image(root / "val2014" / "COCO_val2014_000000000002.jpg")  # image 3 is missing
    got, backend = run(tmp_path, "vqav2", {"10": "Two", "20": "Red."})
    # "2" is 3 of the 10 answers after normalisation: (3 * 2/3 + 7 * 1) / 10 = 0.9; "red" 1.0.
    assert got["metrics"] == pytest.approx({"accuracy": 95.0})
    assert (got["items"], got["answered"], got["missing_images"]) == (3, 2, 1)
    assert got["by_category"] == {
        "number": {"accuracy": pytest.approx(90.0), "n": 1},
        "other": {"accuracy": 100.0, "n": 1},
    }
    assert backend.asked[0].prompt == f"How many dogs?\n{SHORT_ANSWER}"
    rows = {r["id"]: r for r in predictions(tmp_path, "vqav2")}
    assert rows["10"]["score"] == pytest.approx(0.9) and rows["10"]["prediction"] == "Two"
    assert rows["30"]["problem"] == "image not found" and rows["30"]["score"] is None


def test_gqa_textvqa_and_vizwiz_read_their_own_formats(tmp_path):
    gqa = tmp_path / "data" / "gqa"
    write_json(
        gqa / "testdev_balanced_questions.json",
        {
            "a1": {"imageId": "n1", "question": "Which side?", "answer": "left"},
            "a2": {"imageId": "n2", "question": "Is it red?", "answer": "yes"},
        },
    )
    image(gqa / "images" / "n1.jpg")
    image(gqa / "images" / "n2.jpg")
    got, _ = run(tmp_path, "gqa", {"a1": "Left.", "a2": "no"})
    assert got["metrics"] == {"accuracy": 50.0}

    text = tmp_path / "data" / "textvqa"
    write_json(
        text / "TextVQA_0.5.1_val.json",
        {
            "data": [
                {
                    "question_id": 5,
                    "question": "What brand?",
                    "image_id": "abc",
                    "answers": ["coke"] * 3 + ["pepsi"] * 7,
                }
            ]
        },
    )
    # The Rosetta OCR file TextVQA publishes beside the questions: its tokens go in the prompt.
    write_json(
        text / "TextVQA_Rosetta_OCR_v0.2_val.json",
        {"data": [{"image_id": "abc", "ocr_tokens": ["coca", "cola"]}]},
    )
    image(text / "train_images" / "abc.jpg")
    got, backend = run(tmp_path, "textvqa", {"5": "Coke"})
    assert got["metrics"] == pytest.approx({"accuracy": 90.0})  # (3 * 2/3 + 7 * 1) / 10
    assert backend.asked[0].prompt == (
        f"What brand?\nReference OCR token: coca, cola\n{SHORT_ANSWER}"
    )

    viz = tmp_path / "data" / "vizwiz"
    write_json(
        viz / "val.json",
        [
            {
                "image": "VizWiz_val_00000000.jpg",
                "question": "What is this?",
                "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
                "answer_type": "unanswerable",
            }
        ],
    )
    image(viz / "val" / "VizWiz_val_00000000.jpg")
    got, backend = run(tmp_path, "vizwiz", {"VizWiz_val_00000000.jpg": "Unanswerable"})
    assert got["metrics"] == {"accuracy": 100.0}
    assert backend.asked[0].prompt == f"What is this?\n{UNANSWERABLE}\n{SHORT_ANSWER}"


def test_pope_reports_the_metrics_of_each_split_and_of_all(tmp_path):
    root = tmp_path / "data" / "pope"
    image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    for split in ("random", "adversarial"):
        lines = [
            {
                "question_id": 1,
                "image": "COCO_val2014_000000000042.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
            {
                "question_id": 2,
                "image": "COCO_val2014_000000000042.jpg",
                "text": "Is there a cat in the image?",
                "label": "no",
            },
        ]
        (root / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(x) for x in lines))
    said = {
        "random-1": "Yes, there is a dog.",
        "random-2": "No.",
        "adversarial-1": "Yes",
        "adversarial-2": "Yes, I think so.",
    }
    got, _ = run(tmp_path, "pope", said)
    # All four: tp 2, fp 1, tn 1, fn 0.
    assert got["metrics"] == pytest.approx(
        {"accuracy": 75.0, "precision": 200 / 3, "recall": 100.0, "f1": 80.0, "yes_ratio": 75.0}
    )
    assert got["by_category"]["adversarial"] == pytest.approx(
        {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": 200 / 3, "yes_ratio": 100.0}
    )
    assert got["by_category"]["random"]["accuracy"] == 100.0
    assert {r["id"]: r["read"] for r in predictions(tmp_path, "pope")}["random-2"] == "no"


def test_scienceqa_asks_the_test_problems_with_an_image_in_llavas_format(tmp_path):
    root = tmp_path / "data" / "scienceqa"
    base = {"hint": "", "image": "image.png", "split": "test", "subject": "physics"}
    write_json(
        root / "problems.json",
        {
            "1": {**base, "question": "Which is a mammal?", "choices": ["frog", "dog"],
                  "answer": 1, "hint": "Animals.", "subject": "natural science"},
            "2": {**base, "question": "Train?", "choices": ["a", "b"], "answer": 0,
                  "split": "train"},
            "3": {**base, "question": "No image?", "choices": ["a", "b"], "answer": 0,
                  "image": None},
            "4": {**base, "question": "Which is hot?", "choices": ["ice", "fire", "snow"],
                  "answer": 1},
        },
    )  # fmt: skip
    image(root / "images" / "test" / "1" / "image.png", fmt="PNG")
    image(root / "images" / "test" / "4" / "image.png", fmt="PNG")
    got, backend = run(tmp_path, "scienceqa", {"1": "B", "4": "C"})
    assert [i.id for i in backend.asked] == ["1", "4"]
    assert backend.asked[0].prompt == (
        f"Context: Animals.\nWhich is a mammal?\nA. frog\nB. dog\n{OPTION_LETTER}"
    )
    assert backend.asked[1].prompt == f"Which is hot?\nA. ice\nB. fire\nC. snow\n{OPTION_LETTER}"
    assert got["metrics"]["accuracy"] == 50.0


def test_mmbench_is_right_only_when_every_rotation_of_a_question_is(tmp_path):
    root = tmp_path / "data" / "mmbench"
    root.mkdir(parents=True)
    picture = base64.b64encode(png_bytes()).decode()
    fields = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        ["0", "What animal?", "nan", "cat", "dog", "cow", "", "B", "animals", picture],
        ["1", "How many?", "Count them.", "1", "2", "3", "4", "C", "count", picture],
    ]
    with open(root / "MMBench_DEV_EN.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(fields)
        w.writerows(rows)

    def answer(item: EvalItem) -> str:
        wanted = "dog" if item.group == "0" else ("1" if item.id == "1-r2" else "3")
        return "ABCD"[item.options.index(wanted)]

    got, backend = run(tmp_path, "mmbench", answer)
    assert len(backend.asked) == 3 + 4  # each question once per rotation of its options
    r1 = next(i for i in backend.asked if i.id == "0-r1")
    assert r1.prompt == f"What animal?\nA. dog\nB. cow\nC. cat\n{OPTION_LETTER}"
    assert r1.answers == ("A",)
    q1 = next(i for i in backend.asked if i.id == "1-r0")
    assert q1.prompt.startswith("Count them.\nHow many?\nA. 1\n")
    # Question 0 is right in all three rotations, question 1 wrong in one of four.
    assert got["metrics"] == {"accuracy": 50.0, "unreadable": 0.0, "accuracy_first_pass": 100.0}
    assert got["by_category"] == {
        "animals": {"accuracy": 100.0, "n": 1},
        "count": {"accuracy": 0.0, "n": 1},
    }


def test_seedbench_asks_its_image_questions(tmp_path):
    root = tmp_path / "data" / "seedbench"
    choices = {f"choice_{c}": f"option {c}" for c in "abcd"}
    write_json(
        root / "SEED-Bench.json",
        {
            "questions": [
                {"question_id": "q1", "question": "What is shown?", "answer": "C",
                 "data_id": "1454426_2591111986", "data_type": "image", "question_type_id": 1,
                 **choices},
                {"question_id": "q2", "question": "What happens?", "answer": "A",
                 "data_id": "v.mp4", "data_type": "video", "question_type_id": 2, **choices},
            ],
            "question_type": {"Scene Understanding": 1, "Action Recognition": 2},
        },
    )  # fmt: skip
    image(root / "SEED-Bench-image" / "1454426_2591111986.jpg")
    got, backend = run(tmp_path, "seedbench", {"q1": "(C) option c"})
    assert [i.id for i in backend.asked] == ["q1"]
    assert got["metrics"]["accuracy"] == 100.0


def test_captions_score_cider_from_coco_and_karpathy_files(tmp_path):
    references = {
        "1": ["a dog runs on the grass", "a brown dog running in a field"],
        "2": ["two cats sleep on a sofa", "cats sleeping on the couch together"],
        "3": ["a man rides a red bicycle", "a person on a bike in the street"],
    }
    said = {"1": "a dog running on the grass", "2": "two cats on a sofa", "3": "a plate of food"}
    root = tmp_path / "data" / "coco_caption"
    write_json(
        root / "captions_val2014.json",
        {
            "images": [{"id": int(k), "file_name": f"{k}.jpg"} for k in references],
            "annotations": [
                {"image_id": int(k), "caption": c} for k, refs in references.items() for c in refs
            ],
        },
    )
    for k in references:
        image(root / "val2014" / f"{k}.jpg")
    got, _ = run(tmp_path, "coco_caption", said)
    expected = _cider_d(said, references)
    assert got["metrics"]["cider"] == pytest.approx(100 * sum(expected.values()) / 3)

    flickr = tmp_path / "data" / "flickr30k"
    write_json(
        flickr / "dataset_flickr30k.json",
        {
            "images": [
                {
                    "filename": "x.jpg",
                    "imgid": 0,
                    "split": "test",
                    "sentences": [{"raw": "A dog."}],
                },
                {
                    "filename": "y.jpg",
                    "imgid": 1,
                    "split": "train",
                    "sentences": [{"raw": "A cat."}],
                },
            ]
        },
    )
    image(flickr / "x.jpg")
    image(flickr / "y.jpg")
    _, backend = run(tmp_path, "flickr30k", {"0": "a dog"})
    assert [(i.id, i.answers) for i in backend.asked] == [("0", ("A dog.",))]


def test_bad_tasks_and_data_are_errors_before_anything_is_asked(tmp_path, capsys):
    never = Scripted(lambda item: pytest.fail("asked"))
    with pytest.raises(ValueError, match="unknown task 'mmmu'"):
        evaluate(None, ["mmmu"], [str(tmp_path)], str(tmp_path / "o"), backend=never)
    with pytest.raises(ValueError, match=r"no folder gqa/ under"):
        evaluate(None, ["gqa"], [str(tmp_path)], str(tmp_path / "o"), backend=never)
    (tmp_path / "gqa").mkdir()
    with pytest.raises(ValueError, match=r"no file matches '\*questions\*.json'"):
        evaluate(None, ["gqa"], [f"gqa={tmp_path / 'gqa'}"], str(tmp_path / "o"), backend=never)
    (tmp_path / "gqa" / "q_questions.json").write_text("{not json")
    assert cli(["eval", "ckpt", "--tasks", "gqa", "--data", str(tmp_path), "--output", "o"]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_a_task_whose_images_are_all_missing_fails_the_command(tmp_path):
    write_json(
        tmp_path / "data" / "gqa" / "questions.json",
        {"a1": {"imageId": "gone", "question": "Which side?", "answer": "left"}},
    )
    with pytest.raises(ValueError, match="gqa: no item was answered"):
        run(tmp_path, "gqa", {"a1": "left"})
    assert (tmp_path / "out" / "results.json").exists()  # what happened is still written


def gqa_folder(tmp_path: Path, questions: list[str]) -> Path:
    root = tmp_path / "data" / "gqa"
    write_json(
        root / "testdev_balanced_questions.json",
        {
            f"q{k}": {"imageId": f"n{k}", "question": q, "answer": "red"}
            for k, q in enumerate(questions)
        },
    )
    for k in range(len(questions)):
        image(root / f"n{k}.jpg", color=(40 * k, 100, 200 - 40 * k))
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A LLaVA checkpoint with random weights and the vicuna_v1 chat template, as warren train
    saves one."""
    import torch
    from tiny_models import llm_config, vision_config, word_level_tokenizer

    from warren.trainers.model import build_llava
    from warren.trainers.templates import serving_chat_template

    words = ["what color is the picture ? which side is it on , left or right", SHORT_ANSWER]
    tok = word_level_tokenizer(words, special=["<image>"], plain=["\n"])
    torch.manual_seed(0)
    parts = build_llava(vision_config(), llm_config(len(tok) + 1), tokenizer=tok)
    parts.processor.chat_template = serving_chat_template("vicuna_v1", tok)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    parts.save_pretrained(path)
    return path


def test_batched_generation_answers_as_one_at_a_time_does(tiny_checkpoint, tmp_path):
    # Prompts of different lengths in one batch: left padding must not change any answer.
    gqa_folder(tmp_path, ["what color is it?", "which side is the picture on, left or right?", "?"])
    answers = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        evaluate(
            str(tiny_checkpoint), ["gqa"], [str(tmp_path / "data")], str(out),
            batch_size=batch, max_new_tokens=5, device="cpu",
        )  # fmt: skip
        rows = [
            json.loads(x) for x in (out / "predictions" / "gqa.jsonl").read_text().split("\n") if x
        ]
        answers[batch] = {r["id"]: r["prediction"] for r in rows}
    assert answers[1] == answers[3]
    assert all(isinstance(a, str) for a in answers[1].values()) and len(answers[1]) == 3


def test_a_checkpoint_without_a_chat_template_is_refused_with_the_reason(
    tiny_checkpoint, tmp_path, capsys
):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / "chat_template.jinja").unlink()
    gqa_folder(tmp_path, ["what color is it?"])
    code = cli(["eval", str(bare), "--tasks", "gqa", "--data", str(tmp_path / "data")])
    assert code == 2
    assert "the processor has no chat template" in capsys.readouterr().err


def test_an_endpoint_is_asked_with_the_image_and_a_failed_request_is_not_scored(tmp_path):
    gqa_folder(tmp_path, ["what color is it?", "which side?"])
    prompt_2 = f"which side?\n{SHORT_ANSWER}"
    with FakeChatServer(script={prompt_2: ["401"]}) as server:
        results = evaluate(
            "served-model", ["gqa"], [str(tmp_path / "data")], str(tmp_path / "out"),
            endpoint=server.url, model="served-model",
        )  # fmt: skip
        sent = server.contents()
    got = results["tasks"]["gqa"]
    assert (got["items"], got["answered"], got["failed"]) == (2, 1, 1)
    # The fake server answers "answer to <text>", which is not "red".
    assert got["metrics"] == {"accuracy": 0.0}
    first = next(c for c in sent if c[1]["text"].startswith("what color"))
    assert first[0]["type"] == "image_url"
    data = base64.b64decode(first[0]["image_url"]["url"].split(",", 1)[1])
    assert first[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(data)).size == (24, 20)
    rows = {r["id"]: r for r in predictions(tmp_path, "gqa")}
    assert rows["q1"]["prediction"] is None and "401" in rows["q1"]["problem"]
    assert rows["q0"]["prediction"] == f"answer to what color is it?\n{SHORT_ANSWER}"


def test_an_evaluation_is_noted_in_the_run_its_checkpoint_was_trained_on(tmp_path):
    from warren.pipelines.report.page import _evaluations_section

    run = tmp_path / "run"
    (run / "01-sample").mkdir(parents=True)
    (run / "01-sample" / "_manifest.json").write_text(json.dumps({"stage": "sample"}))
    (run / "run.json").write_text(json.dumps({"final": {"folder": "01-sample"}}))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    summary = {"config": {"data": [str(run / "01-sample")]}}
    (checkpoint / "train_summary.json").write_text(json.dumps(summary))
    gqa_folder(tmp_path, ["what color is it?", "which side?"])
    backend = Scripted(lambda item: "red" if item.id == "q0" else "left")
    evaluate(
        str(checkpoint), ["gqa"], [str(tmp_path / "data")], str(tmp_path / "out"), backend=backend
    )
    [entry] = json.loads((run / "evaluations.json").read_text())
    assert entry["checkpoint"] == str(checkpoint.resolve())
    assert entry["results"] == str((tmp_path / "out" / "results.json").resolve())
    assert entry["metrics"] == {"gqa": {"accuracy": 50.0}}
    # The run's report links it.
    section = _evaluations_section(str(run))
    assert "gqa: accuracy 50.00" in section
    assert (tmp_path / "out" / "results.json").resolve().as_uri() in section
    # Evaluated again into the same folder: one entry, the newer.
    evaluate(
        str(checkpoint), ["gqa"], [str(tmp_path / "data")], str(tmp_path / "out"), backend=backend
    )
    assert len(json.loads((run / "evaluations.json").read_text())) == 1
