"""Label masking of the trainers' conversation templates, checked against labels worked out by
hand from a tiny word-level tokenizer (no download), and the errors malformed rows get."""

from __future__ import annotations

import pytest
from tiny_models import word_level_tokenizer

from warren.trainers.templates import (
    ANSWER_TRUNCATED,
    IGNORE_INDEX,
    NO_LOSS_TOKENS,
    OK,
    TRUNCATED,
    ConversationEncoder,
    EncodedSample,
    TemplateError,
    serving_chat_template,
)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
    SYSTEM,
    "USER: ASSISTANT: you are a terse bot",
    "what is in the picture? a red cat sits on a mat.",
    "what color is the cat? the cat is red.",
]
# A role-tagged template in the style of the ones LMs ship: bos, then tagged turns each closed by
# an end-of-turn token and a newline; the generation prompt is the assistant tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }}<|end|>\n"
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }}<|end|>\n"
    "{% else %}<|assistant|> {{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
N_IMG = 3  # image tokens per image; a real CLIP-L/336 tower makes 576


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE, image_token: bool = True):
    """A word-level tokenizer over CORPUS that, like Llama's, puts bos in front of what it encodes
    and has a token for a newline; `<image>` and the chat tags are special added tokens, as in
    llava-hf's tokenizers."""
    extra = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    if image_token:
        extra.insert(0, "<image>")
    tok = word_level_tokenizer(CORPUS, special=extra, plain=["\n"])
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def enc(tok, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids, f"{text!r} has words outside the tiny vocabulary"
    return ids


def one(tok, token: str) -> list[int]:
    return [tok.convert_tokens_to_ids(token)]


def masked(ids: list[int]) -> list[int]:
    return [IGNORE_INDEX] * len(ids)


IMAGE = {"bytes": b"\x89PNG", "path": None}


def two_turn_row(row_id: str = "r1") -> dict:
    return {
        "id": row_id,
        "images": [IMAGE],
        "caption": None,
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture?"},
            {"from": "gpt", "value": "a red cat sits on a mat."},
            {"from": "human", "value": "what color is the cat?"},
            {"from": "gpt", "value": "the cat is red."},
        ],
    }


def vicuna_pieces(tok) -> tuple[list[int], list[int]]:
    """The two-turn row in vicuna_v1, piece by piece: (input_ids, labels)."""
    bos, eos, img = one(tok, "<s>"), one(tok, "</s>"), one(tok, "<image>") * N_IMG
    prompt_1 = bos + enc(tok, SYSTEM) + enc(tok, "USER:") + img
    prompt_1 += enc(tok, "\nwhat is in the picture? ASSISTANT:")
    answer_1 = enc(tok, "a red cat sits on a mat.") + eos
    prompt_2 = enc(tok, "USER: what color is the cat? ASSISTANT:")
    answer_2 = enc(tok, "the cat is red.") + eos
    ids = prompt_1 + answer_1 + prompt_2 + answer_2
    labels = masked(prompt_1) + answer_1 + masked(prompt_2) + answer_2
    return ids, labels


def test_vicuna_v1_puts_only_the_answers_and_their_eos_in_the_loss(tok):
    ids, labels = vicuna_pieces(tok)
    sample = ConversationEncoder(tok, "vicuna_v1", num_image_tokens=N_IMG).encode(two_turn_row())
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert (sample.id, sample.num_images, sample.status) == ("r1", 1, OK)
    assert sample.num_loss_tokens == len(enc(tok, "a red cat sits on a mat. the cat is red.")) + 2


def test_vicuna_v1_takes_the_rows_system_turn_over_the_default_prompt(tok):
    row = two_turn_row()
    row["conversations"] = [{"from": "system", "value": "you are a terse bot"}] + row[
        "conversations"
    ][:2]
    sample = ConversationEncoder(tok, "vicuna_v1", num_image_tokens=N_IMG).encode(row)
    bos, eos, img = one(tok, "<s>"), one(tok, "</s>"), one(tok, "<image>") * N_IMG
    prompt = bos + enc(tok, "you are a terse bot USER:") + img
    prompt += enc(tok, "\nwhat is in the picture? ASSISTANT:")
    answer = enc(tok, "a red cat sits on a mat.") + eos
    assert sample.input_ids == prompt + answer
    assert sample.labels == masked(prompt) + answer


def test_plain_puts_only_the_caption_and_eos_in_the_loss(tok):
    row = {"id": "c1", "images": [IMAGE], "caption": "a red cat sits on a mat."}
    sample = ConversationEncoder(tok, "plain", num_image_tokens=N_IMG).encode(row)
    prompt = one(tok, "<s>") + one(tok, "<image>") * N_IMG
    answer = enc(tok, "a red cat sits on a mat.") + one(tok, "</s>")
    assert sample.input_ids == prompt + answer
    assert sample.labels == masked(prompt) + answer

    # A LLaVA-558K row carries its caption as the answer to a bare <image> turn.
    pair = {
        "id": "c2",
        "images": [IMAGE],
        "conversations": [
            {"from": "human", "value": "<image>\n"},
            {"from": "gpt", "value": "a red cat sits on a mat."},
        ],
    }
    from_pair = ConversationEncoder(tok, "plain", num_image_tokens=N_IMG).encode(pair)
    assert (from_pair.input_ids, from_pair.labels) == (sample.input_ids, sample.labels)


def test_chat_template_puts_the_answers_and_their_end_of_turn_token_in_the_loss(tok):
    sample = ConversationEncoder(tok, "chat_template", num_image_tokens=N_IMG).encode(
        two_turn_row()
    )
    user, asst, end = one(tok, "<|user|>"), one(tok, "<|assistant|>"), one(tok, "<|end|>")
    # The template writes bos itself; the tokenizer must not add a second one.
    newline = enc(tok, "\n")
    prompt_1 = one(tok, "<s>") + user + one(tok, "<image>") * N_IMG
    prompt_1 += enc(tok, "\nwhat is in the picture?") + end + newline + asst
    answer_1 = enc(tok, "a red cat sits on a mat.") + end
    # The newline between turns is template framing: out of the loss, even after the last turn.
    prompt_2 = newline + user + enc(tok, "what color is the cat?") + end + newline + asst
    answer_2 = enc(tok, "the cat is red.") + end
    ids = prompt_1 + answer_1 + prompt_2 + answer_2 + newline
    assert sample.input_ids == ids
    assert sample.labels == masked(prompt_1) + answer_1 + masked(prompt_2) + answer_2 + [
        IGNORE_INDEX
    ]


def test_chat_template_keeps_a_system_turn_out_of_the_loss(tok):
    row = two_turn_row()
    row["conversations"] = [{"from": "system", "value": "you are a terse bot"}] + row[
        "conversations"
    ][:2]
    sample = ConversationEncoder(tok, "chat_template", num_image_tokens=N_IMG).encode(row)
    prompt = one(tok, "<s>") + one(tok, "<|system|>") + enc(tok, "you are a terse bot")
    prompt += (
        one(tok, "<|end|>") + enc(tok, "\n") + one(tok, "<|user|>") + one(tok, "<image>") * N_IMG
    )
    prompt += enc(tok, "\nwhat is in the picture?") + one(tok, "<|end|>") + enc(tok, "\n")
    prompt += one(tok, "<|assistant|>")
    answer = enc(tok, "a red cat sits on a mat.") + one(tok, "<|end|>")
    assert sample.input_ids == prompt + answer + enc(tok, "\n")
    assert sample.labels == masked(prompt) + answer + [IGNORE_INDEX]


def test_a_chat_template_that_rewrites_earlier_turns_is_reported_with_the_row_id():
    # The generation prompt ends in a newline that the rendered answer does not have, so the
    # prompt is not a prefix of the conversation and the answer cannot be located.
    tok = tiny_tokenizer(
        CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    )
    encoder = ConversationEncoder(tok, "chat_template", num_image_tokens=N_IMG)
    with pytest.raises(TemplateError, match="row 'r9'.*prefix"):
        encoder.encode(two_turn_row("r9"))


def test_text_only_conversations_have_no_image_tokens(tok):
    row = two_turn_row()
    row["images"] = []
    row["conversations"][0]["value"] = "\nwhat is in the picture?"
    sample = ConversationEncoder(tok, "vicuna_v1", num_image_tokens=N_IMG).encode(row)
    ids, labels = vicuna_pieces(tok)
    without = [i for i, t in enumerate(ids) if t != tok.convert_tokens_to_ids("<image>")]
    assert sample.input_ids == [ids[i] for i in without]
    assert sample.labels == [labels[i] for i in without]
    assert sample.num_images == 0


def test_truncation_inside_an_answer_is_reported_and_keeps_the_head(tok):
    ids, labels = vicuna_pieces(tok)
    cut = len(ids) - 3  # inside the second answer
    encoder = ConversationEncoder(tok, "vicuna_v1", num_image_tokens=N_IMG, max_length=cut)
    sample = encoder.encode(two_turn_row())
    assert (sample.input_ids, sample.labels) == (ids[:cut], labels[:cut])
    assert sample.truncated and sample.answer_truncated
    assert (sample.num_images, sample.status) == (1, ANSWER_TRUNCATED)


def test_truncation_never_splits_an_image_and_flags_a_sample_left_without_loss(tok):
    ids, _ = vicuna_pieces(tok)
    first_image = ids.index(tok.convert_tokens_to_ids("<image>"))
    encoder = ConversationEncoder(
        tok, "vicuna_v1", num_image_tokens=N_IMG, max_length=first_image + 2
    )
    sample = encoder.encode(two_turn_row())
    assert sample.input_ids == ids[:first_image]
    assert sample.labels == masked(ids[:first_image])
    assert (sample.num_images, sample.num_loss_tokens, sample.status) == (0, 0, NO_LOSS_TOKENS)


def test_truncation_through_a_later_image_keeps_the_earlier_images_and_answers(tok):
    row = two_turn_row()
    row["images"] = [IMAGE, IMAGE]
    row["conversations"][2]["value"] = "<image>\nwhat color is the cat?"
    full = ConversationEncoder(tok, "vicuna_v1", num_image_tokens=N_IMG).encode(row)
    image_id = tok.convert_tokens_to_ids("<image>")
    second_image = [i for i, t in enumerate(full.input_ids) if t == image_id][N_IMG]
    encoder = ConversationEncoder(
        tok, "vicuna_v1", num_image_tokens=N_IMG, max_length=second_image + 1
    )
    sample = encoder.encode(row)
    assert sample.input_ids == full.input_ids[:second_image]
    assert sample.labels == full.labels[:second_image]
    assert sample.num_images == 1
    assert sample.num_loss_tokens == len(enc(tok, "a red cat sits on a mat.")) + 1
    assert sample.status == ANSWER_TRUNCATED


def test_status_names_the_worst_thing_that_happened_to_a_sample():
    loss = [IGNORE_INDEX, 5]
    assert EncodedSample("a", [1, 5], loss, 0).status == OK
    assert EncodedSample("a", [1, 5], loss, 0, truncated=True).status == TRUNCATED
    cut = EncodedSample("a", [1, 5], loss, 0, truncated=True, answer_truncated=True)
    assert cut.status == ANSWER_TRUNCATED
    empty = EncodedSample("a", [1, 5], [IGNORE_INDEX] * 2, 0, truncated=True, answer_truncated=True)
    assert empty.status == NO_LOSS_TOKENS


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


MALFORMED = [
    (
        "vicuna_v1",
        [IMAGE],
        _turns(("gpt", "a red cat."), ("human", "<image> what?")),
        "turn 0 is from 'gpt'",
    ),
    (
        "vicuna_v1",
        [IMAGE],
        _turns(("human", "<image> what?"), ("human", "what?")),
        "turn 1 is from 'human'",
    ),
    ("vicuna_v1", [IMAGE], _turns(("user", "<image> what?"), ("gpt", "a cat.")), "role 'user'"),
    ("vicuna_v1", [IMAGE], _turns(("human", "<image> what?")), "last turn"),
    ("vicuna_v1", [IMAGE], _turns(("human", "what?"), ("gpt", "a cat.")), "0 <image> marker"),
    ("vicuna_v1", [], _turns(("human", "<image> what?"), ("gpt", "a cat.")), "1 <image> marker"),
    (
        "vicuna_v1",
        [IMAGE],
        _turns(("human", "<image><image> what?"), ("gpt", "a cat.")),
        "2 <image>",
    ),
    (
        "vicuna_v1",
        [IMAGE],
        _turns(("human", "<image> what?"), ("gpt", "a <image> cat.")),
        "turn 1 \\(gpt\\)",
    ),
    ("vicuna_v1", [IMAGE], _turns(("human", "<image> what?"), ("gpt", "  ")), "is empty"),
    ("vicuna_v1", [IMAGE], [{"from": "human", "value": None}], "no text"),
    ("chat_template", [IMAGE], [], "no conversations"),
    ("plain", [IMAGE], _turns(("human", "<image> what?"), ("gpt", "a cat.")), "needs a caption"),
    ("plain", [], _turns(("human", "<image>"), ("gpt", "a cat.")), "needs an image"),
]


@pytest.mark.parametrize("template,images,conversations,message", MALFORMED)
def test_a_malformed_row_is_an_error_naming_the_row(tok, template, images, conversations, message):
    row = {"id": "bad-7", "images": images, "caption": None, "conversations": conversations}
    encoder = ConversationEncoder(tok, template, num_image_tokens=N_IMG)
    with pytest.raises(TemplateError, match=f"^row 'bad-7': .*{message}") as info:
        encoder.encode(row)
    assert info.value.row_id == "bad-7"


def test_an_encoder_refuses_a_tokenizer_that_cannot_serve_its_template():
    with pytest.raises(ValueError, match="image token '<image>' is 3 tokens"):
        ConversationEncoder(tiny_tokenizer(image_token=False), "plain", num_image_tokens=N_IMG)
    with pytest.raises(ValueError, match="has none"):
        ConversationEncoder(tiny_tokenizer(chat_template=None), "chat_template", num_image_tokens=1)
    with pytest.raises(ValueError, match="unknown template 'llama_2'"):
        ConversationEncoder(tiny_tokenizer(), "llama_2", num_image_tokens=1)


# --- The chat template a checkpoint carries -------------------------------------------------


def serving_tokenizer(template: str, system_prompt: str | None = None):
    tok = tiny_tokenizer()
    tok.chat_template = serving_chat_template(template, tok, system_prompt=system_prompt)
    return tok


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "chat_template"])
def test_a_checkpoints_chat_template_encodes_rows_exactly_as_training_did(template):
    # Rendering through the carried template (as `--template chat_template` on the checkpoint,
    # or serving, does) must give the ids and labels the model was trained on.
    rows = [two_turn_row()]
    with_system = two_turn_row("r2")
    with_system["conversations"].insert(0, {"from": "system", "value": "you are a terse bot"})
    rows.append(with_system)
    if template == "plain":
        rows = [{"id": "c1", "images": [IMAGE], "caption": "a red cat sits on a mat."}]
        pair = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": rows[0]["caption"]}]
        served_rows = [{**rows[0], "conversations": pair}]
    else:
        served_rows = rows
    trained = ConversationEncoder(tiny_tokenizer(), template, num_image_tokens=N_IMG)
    served = ConversationEncoder(
        serving_tokenizer(template), "chat_template", num_image_tokens=N_IMG
    )
    for row, served_row in zip(rows, served_rows, strict=True):
        a, b = trained.encode(row), served.encode(served_row)
        assert (b.input_ids, b.labels) == (a.input_ids, a.labels)


def test_the_carried_template_renders_content_parts_in_llavas_order():
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat."}]},
        {"role": "user", "content": "and its colour?"},
    ]
    vicuna = serving_tokenizer("vicuna_v1").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert vicuna == (
        f"{SYSTEM} USER: <image>\nwhat is it? ASSISTANT: a cat.</s>USER: and its colour? ASSISTANT:"
    )
    plain = serving_tokenizer("plain").apply_chat_template(messages[:1], tokenize=False)
    assert plain == "<image>"
    chat = serving_tokenizer("chat_template").apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=False
    )
    assert chat == "<s><|user|> <image>\nwhat is it?<|end|>\n<|assistant|> a cat.<|end|>\n"


def test_the_carried_template_keeps_a_system_prompt_that_looks_like_jinja():
    odd = 'say "{{ hi }}" {% raw %} \\ ünïcode \U0001f600\nnext line'
    tok = serving_tokenizer("vicuna_v1", system_prompt=odd)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == odd + " USER: hi ASSISTANT:"


def test_wrapping_an_lms_template_twice_changes_nothing_and_bad_parts_are_errors():
    tok = serving_tokenizer("chat_template")
    assert serving_chat_template("chat_template", tok) == tok.chat_template
    with pytest.raises(Exception, match="content parts of type video are not supported"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)
    with pytest.raises(Exception, match="role tool is not supported"):
        serving_tokenizer("vicuna_v1").apply_chat_template(
            [{"role": "tool", "content": "x"}], tokenize=False
        )
