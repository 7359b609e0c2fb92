"""templates: turn a canonical row into `input_ids` and `labels` for a LLaVA-style model.

Three templates, named as the trainers' `--template` flag takes them:

- `plain`: LLaVA's pretraining (align) format. The image tokens, then the caption, then eos; only
  the caption and eos are in the loss. The text is the row's `caption`, or, for rows without one,
  the answer of a LLaVA-558K style pair (`[{human: "<image>"}, {gpt: caption}]`). LLaVA itself
  ends a plain sample with "\\n"; we end it with eos so a model aligned here also knows when to
  stop.
- `vicuna_v1`: LLaVA-1.5's instruction format, "SYSTEM USER: q ASSISTANT: a</s>USER: ...", with
  the tokenizer's own eos in place of "</s>". The loss covers every assistant answer and the eos
  that closes it.
- `chat_template`: the tokenizer's own Jinja chat template (`apply_chat_template`), for LMs that
  ship one (Qwen, Llama 3, Phi, ...). The loss covers what the model has to generate after the
  template's generation prompt, up to and including its end-of-turn token.

Checkpoints carry the template they were trained with: `serving_chat_template` writes it as a
Jinja chat template, which the trainer gives the processor (and so the saved
`chat_template.jinja`). `processor.apply_chat_template`, lmms-eval's `llava_hf` and vLLM's chat
endpoint then build the prompt the model was trained on, from plain-string contents (with
`<image>` markers, as in the data) or from content parts (`{"type": "image"}` renders as
`<image>` and a newline, LLaVA's order; `{"type": "text"}` as its text). It leaves bos to the
tokenizer, as llava-hf's templates do, so `processor(text=prompt, images=...)` and
`processor.apply_chat_template(..., tokenize=True)` give the training ids.

How the loss is placed: each template renders the whole conversation to one string and records
the character spans the model has to generate; the string is tokenized once with offsets, and a
token is in the loss when its characters overlap a span. Tokenizing the whole string (rather than
concatenating separately tokenized pieces) gives exactly the token ids that serving the same
prompt gives, for any tokenizer, whatever it does at piece boundaries.

For `chat_template` the spans come from rendering prefixes of the conversation: the answer of
assistant turn k starts where `render(messages[:k], add_generation_prompt=True)` ends and ends
where `render(messages[:k + 1])` ends. This works with every template that renders a
conversation's prefix as a prefix of the conversation, which is nearly all of them; a template
that rewrites earlier turns (e.g. one that drops past reasoning) is caught and reported. We do not
use `return_assistant_tokens_mask`: it needs `{% generation %}` markers, which almost no
template shipped with a model has.

Images: every `<image>` marker in a human turn becomes `num_image_tokens` copies of the model's
image token, here, before tokenization. `LlavaForConditionalGeneration` scatters one image
feature into each image-token position and fails unless their counts agree, and LlavaProcessor
expands its markers the same way at inference; expanding here makes sequence lengths,
truncation and label positions those of the sequence the model really sees. Markers stay where
the data put them.

Truncation to `max_length` cuts from the right and never through an image's tokens (the sample
keeps only whole images, and says how many). Nothing is dropped silently: every sample reports
whether it was truncated, whether an answer was cut, and how many tokens are in its loss, and its
`status` sums that up for the trainer to count and skip. A malformed row raises `TemplateError`,
which names the row id and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from warren.stages.schema import IMAGE_MARKER

IGNORE_INDEX = -100
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}

# Sample statuses, worst first; a trainer skips NO_LOSS_TOKENS samples (they teach nothing) and
# counts the rest.
NO_LOSS_TOKENS = "no_loss_tokens"
ANSWER_TRUNCATED = "answer_truncated"
TRUNCATED = "truncated"
OK = "ok"


class TemplateError(ValueError):
    """A row cannot be rendered by a template; the message starts with the row id."""

    def __init__(self, row_id: str, message: str):
        super().__init__(f"row {row_id!r}: {message}")
        self.row_id = row_id


@dataclass(frozen=True)
class EncodedSample:
    """One tokenized sample. `labels[i]` is `input_ids[i]` where the token is in the loss and
    IGNORE_INDEX elsewhere (the model shifts labels itself). `num_images` is how many of the
    row's images have their tokens in `input_ids` (fewer than the row has when truncation
    removed the later ones): give the model exactly the first `num_images` images."""

    id: str
    input_ids: list[int]
    labels: list[int]
    num_images: int
    truncated: bool = False
    answer_truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def status(self) -> str:
        if self.num_loss_tokens == 0:
            return NO_LOSS_TOKENS
        if self.answer_truncated:
            return ANSWER_TRUNCATED
        return TRUNCATED if self.truncated else OK


@dataclass(frozen=True)
class _Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges the model must generate, in order
    add_special_tokens: bool  # False when the template writes bos itself


class ConversationEncoder:
    """Encodes canonical rows with one template; build one per worker and call `encode` per row.

    `image_token` must be a single token of `tokenizer` (build_llava adds it) and
    `num_image_tokens` the number of features the model makes per image
    (`LlavaParts.num_image_tokens`). `system_prompt` replaces vicuna_v1's default system prompt;
    a row's own leading `system` turn wins over both.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        *,
        num_image_tokens: int,
        image_token: str = IMAGE_MARKER,
        max_length: int | None = None,
        system_prompt: str | None = None,
    ):
        if template not in TEMPLATES:
            raise ValueError(
                f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "templates need a fast (Rust) tokenizer: labels are placed by character offsets"
            )
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'chat_template' needs a tokenizer with a chat template; this one has "
                "none: use 'vicuna_v1' or set tokenizer.chat_template"
            )
        if template != "chat_template" and tokenizer.eos_token is None:
            raise ValueError(f"template {template!r} ends answers with eos; the tokenizer has none")
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"image token {image_token!r} is {len(ids)} tokens for this tokenizer; it must "
                "be one added token (build_llava adds it)"
            )
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.template = template
        self.image_token = image_token
        self.image_token_id = ids[0]
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.system_prompt = VICUNA_V1_SYSTEM if system_prompt is None else system_prompt
        self._image_block = image_token * num_image_tokens

    def encode(self, row: Mapping[str, Any]) -> EncodedSample:
        row_id = str(row.get("id"))
        num_images = len(row.get("images") or [])
        if self.template == "plain":
            rendered = self._render_plain(row_id, row, num_images)
        else:
            system, pairs = _parse_turns(row_id, row.get("conversations"), num_images)
            if self.template == "vicuna_v1":
                rendered = self._render_vicuna_v1(system, pairs)
            else:
                rendered = self._render_chat_template(row_id, system, pairs)
        enc = self.tokenizer(
            rendered.text,
            add_special_tokens=rendered.add_special_tokens,
            return_offsets_mapping=True,
        )
        input_ids = list(enc["input_ids"])
        labels = _labels(input_ids, enc["offset_mapping"], rendered.spans)
        positions = [i for i, t in enumerate(input_ids) if t == self.image_token_id]
        if len(positions) != num_images * self.num_image_tokens:
            raise TemplateError(
                row_id,
                f"{len(positions)} image tokens for {num_images} image(s) of "
                f"{self.num_image_tokens} tokens: the text holds the image token "
                f"{self.image_token!r} outside an {IMAGE_MARKER} marker, or the template adds one",
            )
        if any(labels[i] != IGNORE_INDEX for i in positions):
            raise TemplateError(row_id, "an image token falls inside an answer")
        if self.max_length is None or len(input_ids) <= self.max_length:
            return EncodedSample(row_id, input_ids, labels, num_images)
        cut = self.max_length
        kept_images = 0
        for k in range(num_images):
            first = positions[k * self.num_image_tokens]
            last = positions[(k + 1) * self.num_image_tokens - 1]
            if last < cut:
                kept_images += 1
            else:
                # The model needs every token of an image or none of it.
                cut = min(cut, first)
                break
        return EncodedSample(
            row_id,
            input_ids[:cut],
            labels[:cut],
            kept_images,
            truncated=True,
            answer_truncated=any(label != IGNORE_INDEX for label in labels[cut:]),
        )

    def _expand(self, text: str) -> str:
        return text.replace(IMAGE_MARKER, self._image_block)

    def _render_plain(self, row_id: str, row: Mapping[str, Any], num_images: int) -> _Rendered:
        caption = row.get("caption")
        if not caption:
            caption = _pretrain_pair_answer(row_id, row.get("conversations"))
        if IMAGE_MARKER in caption:
            raise TemplateError(row_id, f"the caption holds an {IMAGE_MARKER} marker")
        if num_images == 0:
            raise TemplateError(
                row_id, "the plain (align) template needs an image; the row has none"
            )
        prompt = self._image_block * num_images
        text = prompt + caption + self.tokenizer.eos_token
        return _Rendered(text, [(len(prompt), len(text))], add_special_tokens=True)

    def _render_vicuna_v1(self, system: str | None, pairs: list[tuple[str, str]]) -> _Rendered:
        # LLaVA's conv_vicuna_v1: sep " " after the system prompt and each question, sep2 (eos)
        # after each answer. Generation starts after "ASSISTANT:", so the answer's span starts at
        # the space that follows it: a tokenizer that glues that space to the first word gets
        # that token in the loss, as it must.
        eos = self.tokenizer.eos_token
        text = (self.system_prompt if system is None else system) + " "
        spans = []
        for question, answer in pairs:
            text += f"USER: {self._expand(question)} ASSISTANT:"
            start = len(text)
            text += f" {answer}{eos}"
            spans.append((start, len(text)))
        return _Rendered(text, spans, add_special_tokens=True)

    def _render_chat_template(
        self, row_id: str, system: str | None, pairs: list[tuple[str, str]]
    ) -> _Rendered:
        messages = [] if system is None else [{"role": "system", "content": system}]
        for question, answer in pairs:
            messages.append({"role": "user", "content": self._expand(question)})
            messages.append({"role": "assistant", "content": answer})
        full = self._apply(row_id, messages, add_generation_prompt=False)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(row_id, messages[:k], add_generation_prompt=True)
            through = self._apply(row_id, messages[: k + 1], add_generation_prompt=False)
            if not (through.startswith(prompt) and full.startswith(through)):
                raise TemplateError(
                    row_id,
                    "the tokenizer's chat template does not render a conversation's first turns "
                    f"as a prefix of the whole (at turn {k}), so answers cannot be located; use "
                    "the 'vicuna_v1' template or a chat template without that rewrite",
                )
            # The whitespace a template puts between turns is framing, not part of the answer:
            # generation stops at the end-of-turn token before it.
            end = len(through.rstrip())
            if end <= len(prompt):
                raise TemplateError(row_id, f"the chat template renders answer {k} as nothing")
            spans.append((len(prompt), end))
        # A template that writes bos gets no second one; one that leaves it to the tokenizer (as
        # llava-hf's and our checkpoints' do) gets the tokenizer's, as the processor's
        # apply_chat_template(tokenize=True) decides at inference.
        bos = self.tokenizer.bos_token
        return _Rendered(full, spans, add_special_tokens=not (bos and full.startswith(bos)))

    def _apply(self, row_id: str, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises its own errors, e.g. for an unsupported role
            raise TemplateError(
                row_id, f"the chat template failed: {type(exc).__name__}: {exc}"
            ) from exc


# Marks a template as warren's wrapper around an LM's own, so wrapping is done once.
_WRAPPED = "{#- warren: content parts as text, then the LM's template -#}\n"


def serving_chat_template(
    template: str,
    tokenizer: Any,
    *,
    image_token: str = IMAGE_MARKER,
    system_prompt: str | None = None,
) -> str:
    """The Jinja chat template that renders a conversation as `template` renders it in training
    (see the module's docstring), for a checkpoint's processor and tokenizer.

    `plain`: the user turns' images, each as `image_token` (their text is dropped: an align
    checkpoint learned to caption an image and nothing else), then the assistant turn and eos.
    `vicuna_v1`: LLaVA-1.5's format with `system_prompt` (or a leading system message).
    `chat_template`: the tokenizer's own template, after content parts are joined into text."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    image = _jinja_string(image_token)
    text = (
        "{%- macro warren_text(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for part in content -%}"
        "{%- if part['type'] in ('image', 'image_url') -%}{{ " + image + " + '\n' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- else -%}{{ raise_exception('content parts of type ' + part['type'] "
        "+ ' are not supported; this model takes images and text') }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )
    if template == "chat_template":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ValueError("template 'chat_template' needs a tokenizer with a chat template")
        if own.startswith(_WRAPPED):
            return own
        # Hand the LM's template string contents: it was written for them.
        return (
            _WRAPPED
            + text
            + "{%- set ns = namespace(messages=[]) -%}{%- for message in messages -%}"
            "{%- set ns.messages = ns.messages + [{'role': message['role'], "
            "'content': warren_text(message['content'])}] -%}{%- endfor -%}"
            "{%- set messages = ns.messages -%}\n" + own
        )
    if tokenizer.eos_token is None:
        raise ValueError(f"template {template!r} ends answers with eos; the tokenizer has none")
    eos = _jinja_string(tokenizer.eos_token)
    unexpected = (
        "{{ raise_exception('role ' + message['role'] + ' is not supported; "
        "use system, user and assistant') }}"
    )
    if template == "plain":
        images = (
            "{%- macro warren_images(content) -%}"
            "{%- if content is string -%}{{ " + image + " * content.count(" + image + ") }}"
            "{%- else -%}{%- for part in content -%}"
            "{%- if part['type'] in ('image', 'image_url') -%}{{ " + image + " }}"
            "{%- elif part['type'] == 'text' -%}"
            "{{ " + image + " * part['text'].count(" + image + ") }}"
            "{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{%- endmacro -%}"
        )
        return (
            text + images + "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{ warren_images(message['content']) }}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{ warren_text(message['content']) + " + eos + " }}"
            "{%- elif message['role'] != 'system' -%}" + unexpected + "{%- endif -%}"
            "{%- endfor -%}"
        )
    system = _jinja_string(VICUNA_V1_SYSTEM if system_prompt is None else system_prompt)
    return (
        text + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{ warren_text(messages[0]['content']) + ' ' }}{%- set turns = messages[1:] -%}"
        "{%- else -%}{{ " + system + " + ' ' }}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + warren_text(message['content']) }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ ' ASSISTANT: ' + warren_text(message['content']) + " + eos + " }}"
        "{%- else -%}" + unexpected + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
    )


def _jinja_string(value: str) -> str:
    """`value` as a Jinja string literal (Jinja unescapes literals as Python does)."""
    return json.dumps(value, ensure_ascii=False)


def _parse_turns(
    row_id: str, conversations: Sequence[Mapping[str, Any]] | None, num_images: int
) -> tuple[str | None, list[tuple[str, str]]]:
    """Check a row's turns and return (system prompt or None, [(question, answer), ...])."""
    if not conversations:
        raise TemplateError(row_id, "no conversations")
    turns = list(conversations)
    system = None
    if turns[0].get("from") == "system":
        system = _value(row_id, turns[0], 0)
        turns = turns[1:]
    pairs = []
    markers = 0
    for i, turn in enumerate(turns):
        index = i + (system is not None)
        role = turn.get("from")
        expected = "human" if i % 2 == 0 else "gpt"
        if role not in ROLES:
            raise TemplateError(
                row_id, f"turn {index} has role {role!r}; expected 'human' or 'gpt'"
            )
        if role != expected:
            raise TemplateError(
                row_id,
                f"turn {index} is from {role!r} where {expected!r} was expected; turns must "
                "alternate human, gpt, ... (after an optional leading system turn)",
            )
        value = _value(row_id, turn, index)
        if role == "gpt":
            if IMAGE_MARKER in value:
                raise TemplateError(row_id, f"turn {index} (gpt) holds an {IMAGE_MARKER} marker")
            if not value.strip():
                raise TemplateError(row_id, f"turn {index} (gpt) is empty")
            pairs.append((turns[i - 1]["value"], value))
        else:
            markers += value.count(IMAGE_MARKER)
    if len(turns) % 2:
        raise TemplateError(row_id, "the last turn is from 'human'; a conversation ends with 'gpt'")
    if markers != num_images:
        raise TemplateError(
            row_id,
            f"{markers} {IMAGE_MARKER} marker(s) in the human turns for {num_images} image(s); "
            "each image needs exactly one marker",
        )
    return system, pairs


def _value(row_id: str, turn: Mapping[str, Any], index: int) -> str:
    value = turn.get("value")
    if not isinstance(value, str):
        raise TemplateError(row_id, f"turn {index} has no text (value {value!r})")
    return value


def _pretrain_pair_answer(row_id: str, conversations: Sequence[Mapping[str, Any]] | None) -> str:
    """The caption of a LLaVA-558K style row: one human turn holding only image markers, then
    the caption as the gpt turn."""
    turns = list(conversations or [])
    if (
        len(turns) == 2
        and turns[0].get("from") == "human"
        and turns[1].get("from") == "gpt"
        and isinstance(turns[0].get("value"), str)
        and not turns[0]["value"].replace(IMAGE_MARKER, "").strip()
        and isinstance(turns[1].get("value"), str)
        and turns[1]["value"].strip()
    ):
        return turns[1]["value"]
    raise TemplateError(
        row_id,
        "the plain (align) template needs a caption, or conversations that are one human turn "
        f"holding only {IMAGE_MARKER} and one gpt turn with the caption",
    )


def _labels(
    input_ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """input_ids where a token's characters overlap a span, IGNORE_INDEX elsewhere. Tokens the
    tokenizer adds (bos) have empty offsets and are never in the loss."""
    labels = [IGNORE_INDEX] * len(input_ids)
    j = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        # Offsets and spans both increase, so one pass over each suffices.
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j == len(spans):
            break
        if spans[j][0] < end:
            labels[i] = input_ids[i]
    return labels
