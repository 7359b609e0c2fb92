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
(embeddings, scores, generation provenance). A row without conversations is an ExportError:
LLaVA needs turns (the `export_check` stage rejects such rows; the `hf` export keeps them).
"""

from __future__ import annotations

from typing import Any

from stages.exports.base import ExportError, ExportReport, StageFolder, check_options
from stages.exports.image_tree import export_with_image_tree

FORMAT = "llava"
FILE_NAME = "llava.json"
OPTIONS: tuple[str, ...] = ()
EXTRA_KEYS = ("source", "caption", "url", "license")


def no_turns_error(fmt: str, row_id: str) -> ExportError:
    return ExportError(
        f"row {row_id!r} has no conversations; the {fmt} format needs turns. Run the export_check "
        "stage before exporting (it rejects caption-only rows), or export to hf, which keeps them"
    )


def extra_fields(row: dict) -> dict:
    """The row's `EXTRA_KEYS` that are not null, written beside the format's own keys."""
    return {key: row[key] for key in EXTRA_KEYS if row.get(key) is not None}


def item(row: dict, paths: list[str]) -> dict:
    """One LLaVA item from a canonical row and its exported image paths."""
    turns = row.get("conversations")
    if not turns:
        raise no_turns_error(FORMAT, row["id"])
    out: dict[str, Any] = {"id": row["id"]}
    if paths:
        out["image"] = paths[0] if len(paths) == 1 else paths
    out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in turns]
    return {**out, **extra_fields(row)}


def export(src: StageFolder, dest: str, overwrite: bool = False, **options: Any) -> ExportReport:
    check_options(FORMAT, options, OPTIONS)
    return export_with_image_tree(src, dest, FORMAT, FILE_NAME, item, overwrite)
