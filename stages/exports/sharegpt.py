"""ShareGPT-style export for LLaMA-Factory: `data.json`, `dataset_info.json` and the image tree.

    dest/
      data.json           [{"messages": [{"role": "user", "content": "<image>What is it?"},
                                         {"role": "assistant", "content": "A cat."}],
                            "images": ["a/cat.png"], "id": "...", "source": "..."}, ...]
      dataset_info.json   {"<name>": {"file_name": "data.json", "formatting": "sharegpt",
                                      "columns": {"messages": "messages", "images": "images"},
                                      "tags": {"role_tag": "role", "content_tag": "content",
                                               "user_tag": "user", "assistant_tag": "assistant",
                                               "system_tag": "system"}}}
      a/cat.png ...       every image at its path (see `stages.exports.image_tree`)

This is the layout of LLaMA-Factory's `data/mllm_demo.json` and its "OpenAI format" entry in
`data/README.md` (role/content messages, an optional leading system message, `images` a list of
paths, one `<image>` marker in the text per image, kept where it was). Train with
`dataset: <name>` and `dataset_dir: dest` (image paths are relative to it, LLaMA-Factory's default
`media_dir`). Option `name` names the entry (default: the dest folder's name). `images` is always
a list (empty for text-only rows). `id`, `source`, `caption`, `url` and `license` are extra keys
LLaMA-Factory ignores; the `llava_json` reader reads the folder back through `dataset_info.json`.
Roles: human -> user, gpt -> assistant, system -> system (others are written as they are).
Kept and lost: as for the llava export. Caption rows: as for the llava export (a user message
holding the image marker and an instruction, an assistant message holding the caption; option
`caption_template`), and rows with neither turns nor a caption are counted, not written.
"""

from __future__ import annotations

from typing import Any

from warren.stages.exports.base import ExportError, ExportReport, StageFolder, check_options
from warren.stages.exports.caption import template_from
from warren.stages.exports.image_tree import export_with_image_tree
from warren.stages.exports.llava import extra_fields
from warren.stages.readers.columns import ROLE_TO_FROM
from warren.stages.shards import Location

FORMAT = "sharegpt"
FILE_NAME = "data.json"
INFO_NAME = "dataset_info.json"
OPTIONS = ("name", "caption_template")
FROM_TO_ROLE = {v: k for k, v in ROLE_TO_FROM.items()}


def dataset_info(name: str) -> dict:
    """The `dataset_info.json` entry LLaMA-Factory needs to find and parse `data.json`."""
    return {
        name: {
            "file_name": FILE_NAME,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }


def item(row: dict, turns: list[dict], paths: list[str]) -> dict:
    """One LLaMA-Factory item from a canonical row, the turns to write and its image paths."""
    out: dict[str, Any] = {
        "messages": [
            {"role": FROM_TO_ROLE.get(t["from"], t["from"]), "content": t["value"]} for t in turns
        ],
        "images": paths,
        "id": row["id"],
    }
    return {**out, **extra_fields(row)}


def export(src: StageFolder, dest: str, overwrite: bool = False, **options: Any) -> ExportReport:
    check_options(FORMAT, options, OPTIONS)
    name = options.get("name") or Location.of(dest).path.rstrip("/").rsplit("/", 1)[-1]
    if not isinstance(name, str) or not name.strip():
        raise ExportError(f"export {FORMAT}: option name must be a non-empty string, got {name!r}")
    template = template_from(options)
    return export_with_image_tree(
        src,
        dest,
        FORMAT,
        FILE_NAME,
        item,
        overwrite,
        template,
        extra_files={INFO_NAME: dataset_info(name)},
    )
