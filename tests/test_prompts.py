"""Prompts: every shipped prompt loads and renders; versions, hashes and errors behave as documented."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from warren.prompts import PROMPTS_DIR, PromptError, image_mime, list_prompts, load_prompt

SHIPPED = ("conversation", "detail", "complex_reasoning")
SHIPPED_VISION = ("allava_caption", "allava_question", "allava_answer", "detailed_caption")
SHIPPED_TEXT = ("capfusion",)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 200, 90)).save(buf, format="JPEG")
    return buf.getvalue()


SAMPLE = {
    "captions": ["A dog on a couch.", "A brown dog resting."],
    "boxes": [{"category": "dog", "x0": 0.25, "y0": 0.25, "x1": 0.75, "y1": 0.75}],
    "caption": "A brown dog lies on a green couch.",
    "question": "What colour is the couch?",
    "image": jpeg(),
    "original_caption": "dog couch IMG_2041.jpg",
    "synthetic_caption": "A brown dog lies on a green couch.",
}


def test_every_shipped_prompt_loads_and_renders_a_sample_context():
    names = list_prompts()
    assert set(SHIPPED + SHIPPED_VISION + SHIPPED_TEXT) <= set(names)
    for name in names:
        prompt = load_prompt(name)
        messages = prompt.render(SAMPLE)
        assert messages[0]["role"] == "system" and messages[0]["content"]
        roles = [m["role"] for m in messages[1:]]
        assert roles == ["user", "assistant"] * len(prompt.few_shot) + ["user"]
        assert prompt.id == f"{name}@v{prompt.version}"
        assert len(prompt.sha256) == 64
        if prompt.output_format == "json_qa":
            for _, answer in prompt.few_shot:  # the examples show the format the parser expects
                pairs = json.loads(answer)
                assert pairs and all(set(p) == {"question", "answer"} for p in pairs)


def test_llava_prompts_have_few_shot_examples_and_vision_prompts_send_the_image():
    for name in SHIPPED:
        assert len(load_prompt(name).few_shot) >= 1
        assert not load_prompt(name).uses_image
    for name in SHIPPED_VISION:
        assert load_prompt(name).uses_image


def _write(folder: Path, version: int, system: str = "Be brief.") -> Path:
    path = folder / f"toy.v{version}.yaml"
    path.write_text(
        f"""name: toy
version: {version}
description: A toy prompt.
inputs: [captions, boxes]
system: {system}
user: |
  Captions:
  {{% for c in captions %}}
  - {{{{ c }}}}
  {{% endfor %}}
  Objects:
  {{% for b in boxes %}}
  - {{{{ b.category }}}}: {{{{ b | box }}}}
  {{% endfor %}}
few_shot:
  - context:
      captions: [A cat.]
      boxes: [{{category: cat, x0: 0, y0: 0.5, x1: 0.5, y1: 1}}]
    assistant: A cat sits at the bottom left.
output_format: text
"""
    )
    return path


def test_rendered_messages_are_exact_for_a_hand_worked_case(tmp_path: Path):
    _write(tmp_path, 1)
    prompt = load_prompt("toy", root=tmp_path)
    context = {
        "captions": ["Two cups.", "Cups on a table."],
        "boxes": [
            {"category": "cup", "x0": 0.1, "y0": 0.2, "x1": 0.3, "y1": 0.4},
            {"category": "dining table", "x0": 0.0, "y0": 0.5, "x1": 1.0, "y1": 1.0},
        ],
    }
    assert prompt.render(context) == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": "Captions:\n- A cat.\nObjects:\n- cat: [0.000, 0.500, 0.500, 1.000]",
        },
        {"role": "assistant", "content": "A cat sits at the bottom left."},
        {
            "role": "user",
            "content": "Captions:\n- Two cups.\n- Cups on a table.\nObjects:\n"
            "- cup: [0.100, 0.200, 0.300, 0.400]\n"
            "- dining table: [0.000, 0.500, 1.000, 1.000]",
        },
    ]


def test_latest_version_is_loaded_unless_one_is_asked_for(tmp_path: Path):
    _write(tmp_path, 1, system="First.")
    _write(tmp_path, 2, system="Second.")
    assert list_prompts(tmp_path) == {"toy": [1, 2]}
    assert load_prompt("toy", root=tmp_path).id == "toy@v2"
    assert load_prompt("toy", 1, root=tmp_path).system == "First."
    with pytest.raises(PromptError, match="no version 3; versions: 1, 2"):
        load_prompt("toy", 3, root=tmp_path)
    with pytest.raises(PromptError, match="unknown prompt 'nope'"):
        load_prompt("nope", root=tmp_path)


def test_hash_changes_when_the_file_changes(tmp_path: Path):
    path = _write(tmp_path, 1)
    before = load_prompt("toy", root=tmp_path).sha256
    assert load_prompt("toy", root=tmp_path).sha256 == before
    path.write_text(path.read_text().replace("Be brief.", "Be very brief."))
    assert load_prompt("toy", root=tmp_path).sha256 != before


def test_missing_context_key_is_an_error_naming_prompt_and_key():
    context = dict(SAMPLE)
    del context["boxes"]
    with pytest.raises(
        PromptError, match=r"prompt conversation@v1 .*missing context key\(s\) boxes"
    ):
        load_prompt("conversation", 1).render(context)


def test_undefined_attribute_in_template_is_an_error_naming_the_prompt(tmp_path: Path):
    path = _write(tmp_path, 1)
    path.write_text(path.read_text().replace("b.category", "b.label"))
    with pytest.raises(PromptError, match="prompt toy@v1 .*few_shot\\[0\\].*label"):
        load_prompt("toy", root=tmp_path).render({"captions": [], "boxes": []})


def test_template_variables_must_be_declared_inputs(tmp_path: Path):
    path = _write(tmp_path, 1)
    path.write_text(path.read_text().replace("inputs: [captions, boxes]", "inputs: [captions]"))
    with pytest.raises(PromptError, match="uses \\['boxes'\\], not listed in inputs"):
        load_prompt("toy", root=tmp_path)


def test_image_data_url_decodes_back_to_the_same_bytes():
    messages = load_prompt("allava_answer").render(SAMPLE)
    content = messages[-1]["content"]
    assert content[0]["type"] == "image_url" and content[1]["type"] == "text"
    assert "Question: What colour is the couch?" in content[1]["text"]
    url = content[0]["image_url"]["url"]
    header, payload = url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    assert base64.b64decode(payload) == SAMPLE["image"]


def test_image_that_is_not_bytes_or_not_an_image_is_a_clear_error():
    with pytest.raises(PromptError, match="allava_caption@v1: context key 'image' must be image"):
        load_prompt("allava_caption").render({"image": "cat.jpg"})
    with pytest.raises(PromptError, match="not JPEG, PNG, GIF or WebP"):
        load_prompt("allava_caption").render({"image": b"plain text"})
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    assert image_mime(buf.getvalue()) == "image/png"


def test_prompt_files_are_named_after_their_name_and_version(tmp_path: Path):
    shutil.copy(PROMPTS_DIR / "llava" / "detail.v1.yaml", tmp_path / "detail.v2.yaml")
    with pytest.raises(PromptError, match="disagree with the file name"):
        load_prompt("detail", root=tmp_path)
