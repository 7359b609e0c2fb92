"""Versioned prompt templates for instruction generation, shipped as data next to this module.

Each prompt is one YAML file `prompts/<family>/<name>.v<N>.yaml` holding:

- `name`, `version` (must agree with the file name), `description`;
- `inputs`: the context keys the prompt needs (`image` means image bytes, sent as a data URL);
- `system`: the system message;
- `user`: a Jinja2 template rendering the user message from the context;
- `few_shot`: examples, each `{context: {...}, assistant: "..."}`; the example's user message is
  rendered from its context with the same `user` template, so examples and the real request are
  always formatted alike;
- `output_format` (`json_qa`: a JSON list of `{"question", "answer"}` objects, or `text`) and
  `output_notes` for the code that parses the reply.

    prompt = load_prompt("conversation")              # latest version
    messages = prompt.render({"captions": [...], "boxes": [...]})
    row["gen_prompt"] = prompt.id                     # "conversation@v1"; prompt.sha256 pins it

`render` returns OpenAI chat messages. Prompts with `image` among their inputs put the image
first in the final user message as an `image_url` part with a `data:<mime>;base64,` URL.
Templates use StrictUndefined: a missing key is a `PromptError` naming the prompt and the key.
Boxes are mappings with `category`, `x0`, `y0`, `x1`, `y1` (the COCO reader's `boxes` column);
the `box` filter prints their corners as `[x0, y0, x1, y1]` with three decimals.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml

PROMPTS_DIR = Path(__file__).resolve().parent
_FILE_NAME = re.compile(r"^(?P<name>[a-z0-9_]+)\.v(?P<version>[0-9]+)\.ya?ml$")
_REQUIRED = ("name", "version", "description", "inputs", "system", "user", "output_format")
OUTPUT_FORMATS = ("json_qa", "text")
IMAGE_INPUT = "image"
_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class PromptError(ValueError):
    """A prompt file that is malformed or a context that does not fit it; names prompt and reason."""


def _box(box: Any) -> str:
    try:
        corners = [float(box[k]) for k in ("x0", "y0", "x1", "y1")]
    except (KeyError, TypeError, ValueError) as exc:
        raise PromptError(f"box {box!r} needs numeric x0, y0, x1, y1") from exc
    return "[" + ", ".join(f"{v:.3f}" for v in corners) + "]"


def _environment() -> jinja2.Environment:
    # No autoescape: the output is chat text, not HTML. trim_blocks keeps `{% for %}` lines clean.
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["box"] = _box
    return env


_ENV = _environment()


def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes (JPEG, PNG, GIF, WebP); PromptError otherwise."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise PromptError(f"image bytes are not JPEG, PNG, GIF or WebP (start {data[:8]!r})")


def image_data_url(data: bytes, mime: str | None = None) -> str:
    """`data:<mime>;base64,...` for image bytes; the MIME type is read from the bytes when not given."""
    return f"data:{mime or image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One version of one prompt, loaded from its file; `render` builds the chat messages."""

    name: str
    version: int
    description: str
    inputs: tuple[str, ...]
    system: str
    user: str
    few_shot: tuple[tuple[Mapping[str, Any], str], ...]
    output_format: str
    output_notes: str
    path: Path
    sha256: str

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def uses_image(self) -> bool:
        return IMAGE_INPUT in self.inputs

    def _render_user(self, context: Mapping[str, Any], what: str) -> str:
        try:
            return _ENV.from_string(self.user).render(context).strip()
        except jinja2.UndefinedError as exc:
            raise PromptError(f"prompt {self.id} ({self.path}): {what}: {exc.message}") from exc

    def user_text(self, context: Mapping[str, Any]) -> str:
        """The final user message's text for `context` (the image, if any, is not needed): what an
        in-process model gets next to the image its processor encodes."""
        return self._render_user(context, "context")

    def render(self, context: Mapping[str, Any]) -> list[dict[str, Any]]:
        """System message, few-shot user/assistant pairs, then the user message for `context`.

        `context` holds every key of `inputs`; `image` is the encoded image bytes, and
        `image_mime` (optional) overrides the MIME type read from them.
        """
        missing = [k for k in self.inputs if k not in context]
        if missing:
            raise PromptError(
                f"prompt {self.id} ({self.path}): missing context key(s) {', '.join(missing)}"
            )
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system.strip()}]
        for i, (example, answer) in enumerate(self.few_shot):
            messages.append(
                {"role": "user", "content": self._render_user(example, f"few_shot[{i}]")}
            )
            messages.append({"role": "assistant", "content": answer.strip()})
        text = self._render_user(context, "context")
        if not self.uses_image:
            messages.append({"role": "user", "content": text})
            return messages
        image = context[IMAGE_INPUT]
        if not isinstance(image, bytes | bytearray | memoryview):
            raise PromptError(
                f"prompt {self.id}: context key 'image' must be image bytes, "
                f"got {type(image).__name__}"
            )
        try:
            url = image_data_url(bytes(image), context.get("image_mime"))
        except PromptError as exc:
            raise PromptError(f"prompt {self.id}: {exc}") from exc
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": text},
                ],
            }
        )
        return messages


def _prompt_files(root: Path) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(root.rglob("*.y*ml")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            continue
        name, version = match["name"], int(match["version"])
        other = found.setdefault(name, {}).get(version)
        if other is not None:
            raise PromptError(f"prompt {name}@v{version} defined twice: {other} and {path}")
        found[name][version] = path
    return found


def _parse(path: Path, name: str, version: int) -> Prompt:
    raw = path.read_bytes()
    where = f"prompt file {path}"
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PromptError(f"{where}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise PromptError(f"{where}: expected a mapping at the top level")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise PromptError(f"{where}: missing field(s) {', '.join(missing)}")
    if data["name"] != name or data["version"] != version:
        raise PromptError(
            f"{where}: name/version {data['name']!r}/{data['version']!r} disagree with the "
            f"file name ({name}, v{version})"
        )
    if data["output_format"] not in OUTPUT_FORMATS:
        raise PromptError(f"{where}: output_format must be one of {', '.join(OUTPUT_FORMATS)}")
    inputs = tuple(data["inputs"])
    try:
        used = jinja2.meta.find_undeclared_variables(_ENV.parse(data["user"]))
    except jinja2.TemplateSyntaxError as exc:
        raise PromptError(f"{where}: user template line {exc.lineno}: {exc.message}") from exc
    undeclared = sorted(used - set(inputs))
    if undeclared:
        raise PromptError(f"{where}: user template uses {undeclared}, not listed in inputs")
    examples = []
    for i, ex in enumerate(data.get("few_shot") or []):
        if not (isinstance(ex, dict) and isinstance(ex.get("context"), dict)):
            raise PromptError(f"{where}: few_shot[{i}] needs a 'context' mapping")
        if not isinstance(ex.get("assistant"), str):
            raise PromptError(f"{where}: few_shot[{i}] needs an 'assistant' string")
        examples.append((ex["context"], ex["assistant"]))
    return Prompt(
        name=name,
        version=version,
        description=str(data["description"]).strip(),
        inputs=inputs,
        system=str(data["system"]),
        user=str(data["user"]),
        few_shot=tuple(examples),
        output_format=data["output_format"],
        output_notes=str(data.get("output_notes") or "").strip(),
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def list_prompts(root: str | Path | None = None) -> dict[str, list[int]]:
    """Every prompt name under `root` (default: the shipped prompts) with its versions, ascending."""
    files = _prompt_files(Path(root) if root is not None else PROMPTS_DIR)
    return {name: sorted(versions) for name, versions in sorted(files.items())}


def load_prompt(name: str, version: int | None = None, root: str | Path | None = None) -> Prompt:
    """Prompt `name` at `version` (None: the latest); PromptError listing what exists otherwise."""
    files = _prompt_files(Path(root) if root is not None else PROMPTS_DIR)
    versions = files.get(name)
    if not versions:
        raise PromptError(f"unknown prompt {name!r}; known prompts: {', '.join(sorted(files))}")
    chosen = max(versions) if version is None else version
    if chosen not in versions:
        raise PromptError(
            f"prompt {name!r} has no version {version!r}; versions: "
            f"{', '.join(str(v) for v in sorted(versions))}"
        )
    return _parse(versions[chosen], name, chosen)


__all__ = [
    "PROMPTS_DIR",
    "Prompt",
    "PromptError",
    "image_data_url",
    "image_mime",
    "list_prompts",
    "load_prompt",
]
