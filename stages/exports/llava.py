"""LLaVA JSON export: `llava.json` plus the image tree (LLaVA, Bunny, TinyLLaVA, ShareGPT4V).

    dest/
      llava.json      [{"id": "...", "image": "a/cat.png" | ["p1", "p2"], "conversations": [...],
                        "source": "...", "caption": "...", "url": "...", "license": "..."}, ...]
      a/cat.png ...   every image at its path (see `stages.exports.image_tree`)

Train with LLaVA's `--data_path dest/llava.json --image_folder dest`. Ids are always strings
(the `llava_json` reader's convention); `image` is a path for one image and a list for several
(LLaVA-1.5 reads one, LLaVA-NeXT/OneVision-style loaders and the `llava_json` reader read both);
text-only rows have no `image` key. `source`, `caption`, `url` and `license` are written when not
null: LLaVA's loader ignores keys it does not know, and the `llava_json` reader reads them back.
Kept: id, turns, image bytes and paths, source, caption, url, license. Lost: every other column
(embeddings, scores, generation provenance).

Caption rows (no conversations, a caption, an image) are written as LLaVA's pretraining data
(LCS-558K) is: a human turn holding the image marker and a brief-description instruction, a gpt
turn holding the caption (`stages.exports.caption`; option `caption_template`). The `caption` key
keeps the caption too. A row with conversations and a caption keeps its conversations; the caption
goes in the `caption` key. Rows with neither are not written and are counted by reason in the
report; an export that writes no row is an ExportError.
"""

from __future__ import annotations

from typing import Any

from warren.stages.exports.base import ExportReport, StageFolder, check_options
from warren.stages.exports.caption import template_from
from warren.stages.exports.image_tree import export_with_image_tree

FORMAT = "llava"
FILE_NAME = "llava.json"
OPTIONS: tuple[str, ...] = ("caption_template",)
EXTRA_KEYS = ("source", "caption", "url", "license")


def extra_fields(row: dict) -> dict:
    """The row's `EXTRA_KEYS` that are not null, written beside the format's own keys."""
    return {key: row[key] for key in EXTRA_KEYS if row.get(key) is not None}


def item(row: dict, turns: list[dict], paths: list[str]) -> dict:
    """One LLaVA item from a canonical row, the turns to write and its exported image paths."""
    out: dict[str, Any] = {"id": row["id"]}
    if paths:
        out["image"] = paths[0] if len(paths) == 1 else paths
    out["conversations"] = turns
    return {**out, **extra_fields(row)}


def export(src: StageFolder, dest: str, overwrite: bool = False, **options: Any) -> ExportReport:
    check_options(FORMAT, options, OPTIONS)
    template = template_from(options)
    return export_with_image_tree(src, dest, FORMAT, FILE_NAME, item, overwrite, template)
