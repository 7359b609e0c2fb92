"""Hugging Face `datasets` export for TRL: a `save_to_disk` folder with role/content messages.

Columns (explicit `datasets.Features`):

- `id`: string; `source`: string;
- `images`: `List(Image())`, each image's bytes kept as they are (no image tree). Its `path`
  keeps the file name only: `save_to_disk` embeds local images and stores the base name of their
  path (`datasets` behaviour, not ours), so `a/cat.png` reads back as `cat.png`; a null path stays
  null. Paths are names here, never written to, so they are not checked;
- `messages`: list of `{"role": "user" | "assistant" | "system", "content": [{"type": "text" |
  "image", "text": str | null}]}`: TRL's vision-SFT layout (its "Dataset formats" guide and
  `HuggingFaceH4/llava-instruct-mix-vsft`: `{"type": "image"}` parts in the content, the images in
  the `images` column, in order). Each turn's text is split at its `<image>` markers into text
  parts and image parts: the markers are removed, their positions kept, the text kept exactly
  (newlines included; empty text parts dropped).
- `caption`, `url`, `license`: strings, each only when some row has one.

Caption rows (no conversations, a caption, an image) get LLaVA's pretraining pair as messages,
as in the llava export (`stages.exports.caption`, option `caption_template`): a user message of
an image part per image (plus the instruction's text part when the template has one) and an
assistant message holding the caption; `caption` keeps the caption too. A row with conversations
and a caption keeps its conversations as messages and its caption in `caption`. Rows with neither
are not written and are counted by reason in the report; an export of no rows is an ExportError.

`datasets.load_from_disk(dest)` loads it; TRL's `SFTTrainer` takes it with a processor whose chat
template turns `{"type": "image"}` parts into the model's image tokens. The `hf_datasets` reader
reads it back: content parts are concatenated with an image part as `<image>`, which inverts the
split exactly. Kept: id, image bytes, image file names, turns, source, caption, url, license.
Lost: the folders of image paths (above) and every other column. Rows are streamed into
`Dataset.from_generator`, whose Arrow cache lives in a scratch folder next to `dest` and is
deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

from warren.stages.exports.base import (
    ExportError,
    ExportReport,
    Skipped,
    SkipRow,
    StagedFolder,
    StageFolder,
    check_options,
)
from warren.stages.exports.caption import CaptionTemplate, template_from, turns_of
from warren.stages.readers.columns import ROLE_TO_FROM
from warren.stages.schema import IMAGE_MARKER

FORMAT = "hf"
OPTIONS: tuple[str, ...] = ("caption_template",)
OPTIONAL_COLUMNS = ("caption", "url", "license")
FROM_TO_ROLE = {v: k for k, v in ROLE_TO_FROM.items()}


def content_parts(text: str | None) -> list[dict] | None:
    """A turn's text as TRL content parts: text around each `<image>` marker, an image part for
    each marker; concatenating the parts with an image part as `<image>` gives `text` back."""
    if text is None:
        return None
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i:
            parts.append({"type": "image", "text": None})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def messages(turns: list[dict] | None) -> list[dict] | None:
    if turns is None:
        return None
    return [
        {
            "role": FROM_TO_ROLE.get(t["from"], t["from"]),
            "content": content_parts(t["value"]),
        }
        for t in turns
    ]


def features(optional: list[str]):
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {
            "id": string,
            "images": datasets.List(datasets.Image()),
            "messages": datasets.List(
                {
                    "role": string,
                    "content": datasets.List({"type": string, "text": string}),
                }
            ),
            "source": string,
            **{name: string for name in optional},
        }
    )


def _rows(
    src: StageFolder,
    optional: tuple[str, ...],
    template: CaptionTemplate,
    counts: dict,
    token: str,
) -> Iterator[dict]:
    # `token` is unique per export: `datasets` caches a generator's output by a hash of its
    # arguments, and an export must never be served from an earlier export's cache.
    del token
    skipped: Skipped = counts["skipped"]
    for batch in src.batches():
        for row in batch:
            counts["given"] += 1
            try:
                turns = turns_of(row, template)
            except SkipRow as skip:
                skipped.add(skip.reason, row["id"])
                continue
            counts["captions"] += not row.get("conversations")
            images = row.get("images") or []
            for k, image in enumerate(images):
                if not (image or {}).get("bytes"):
                    raise ExportError(
                        f"row {row['id']!r}, image {k + 1} of {len(images)}: no bytes; run the "
                        "export_check stage before exporting (it rejects such rows)"
                    )
            counts["rows"] += 1
            counts["images"] += len(images)
            out = {
                "id": row["id"],
                "images": [{"bytes": i["bytes"], "path": i.get("path")} for i in images],
                "messages": messages(turns),
                "source": row.get("source"),
            }
            for name in optional:
                out[name] = row.get(name)
            yield out


def export(src: StageFolder, dest: str, overwrite: bool = False, **options: Any) -> ExportReport:
    import datasets

    check_options(FORMAT, options, OPTIONS)
    template = template_from(options)
    optional = [name for name in OPTIONAL_COLUMNS if src.has_values(name)]
    counts = {"rows": 0, "images": 0, "given": 0, "captions": 0, "skipped": Skipped()}
    # `datasets` draws progress bars for generating and saving: noise in a pipeline's log.
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _export(datasets, src, dest, overwrite, optional, template, counts)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _local_folders(staged: StagedFolder) -> Iterator[tuple[str, str]]:
    """(cache dir, save dir) for `datasets`, which writes only to local paths: the staged
    folder's own on a local disk; on an object store (s3://, gs://) a local temporary folder,
    whose saved dataset is then copied into the staged folder."""
    if isinstance(staged.path.fs, pafs.LocalFileSystem):
        yield staged.scratch.path, staged.path.path
        return
    with tempfile.TemporaryDirectory(prefix="warren-hf-export-") as tmp:
        yield os.path.join(tmp, "cache"), os.path.join(tmp, "dataset")


def _export(
    datasets: Any,
    src: StageFolder,
    dest: str,
    overwrite: bool,
    optional: list,
    template: CaptionTemplate,
    counts: dict,
) -> ExportReport:
    skipped: Skipped = counts["skipped"]
    with StagedFolder(dest, overwrite, src.location) as staged, _local_folders(staged) as local:
        scratch, saved = local
        try:
            ds = datasets.Dataset.from_generator(
                _rows,
                features=features(optional),
                cache_dir=scratch,
                gen_kwargs={
                    "src": src,
                    "optional": tuple(optional),
                    "template": template,
                    "counts": counts,
                    "token": uuid.uuid4().hex,
                },
            )
        except datasets.exceptions.DatasetGenerationError as exc:
            # `datasets` wraps what the generator raised; the user needs our message, not its.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ExportError):
                raise cause from None
            raise
        except ValueError:
            # A generator that yields nothing makes `datasets` fail with "corresponds to no data";
            # the user needs to know why no row was written.
            if counts["rows"] == 0 and counts["given"] == src.rows:
                skipped.check_any_written(FORMAT, src.location, 0, counts["given"])
            raise
        if len(ds) != counts["rows"] or counts["rows"] + skipped.total() != src.rows:
            raise ExportError(
                f"{src.location.uri}: wrote {len(ds):,} rows and skipped {skipped.total():,} of "
                f"{src.rows:,}"
            )
        skipped.check_any_written(FORMAT, src.location, counts["rows"], counts["given"])
        ds.save_to_disk(saved)
        del ds
        if saved != staged.path.path:
            pafs.copy_files(
                saved,
                staged.path.path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=staged.path.fs,
            )
        files, size = staged.totals()
    return ExportReport(
        format=FORMAT,
        dest=staged.dest.uri,
        rows=counts["rows"],
        images=counts["images"],
        bytes=size,
        files=files,
        given=counts["given"],
        captions=counts["captions"],
        skipped=dict(counts["skipped"].counts),
        skipped_lines=counts["skipped"].lines(),
    )
