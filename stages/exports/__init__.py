"""Exports: canonical rows out to the formats trainers read, and back in through the readers.

    report = export("out/llava/03-export_check", "llava", "exports/llava")
    print(report.summary())

`src` is a warren stage folder (its `_manifest.json` lists the kept shards, read in order) or a
pipeline output folder (its `run.json` names the final stage folder). Formats:

- `llava` (`stages.exports.llava`): `llava.json` plus the image tree; option `caption_template`;
- `sharegpt` (`stages.exports.sharegpt`): LLaMA-Factory's `data.json` + `dataset_info.json` plus
  the image tree; options `name`, `caption_template`;
- `hf` (`stages.exports.hf`): a `datasets` save_to_disk folder with TRL's role/content messages;
  option `caption_template`.

Every export is written to a temporary folder and renamed into place; a non-empty `dest` is
refused unless `overwrite=True`. Rows are streamed (a Parquet batch at a time). Caption rows (no
conversations, a caption, an image) are written in every format as LLaVA's pretraining pair
(`stages.exports.caption`; option `caption_template`). A row no format can hold (no turns and no
caption, ...) is not written: the report counts it by reason (`report.skipped`, `summary()`), and
an export that writes no row is an ExportError, never an empty success. Run the `export_check`
stage first: the exporters refuse rows they cannot write faithfully (no bytes, a path leaving
the folder: an ExportError naming the row) but do not validate turns or markers.
Importing an export with the readers (`get_reader(None, dest)`) gives back the same rows for the
fields the format has (see each module), caption rows with their exported turns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from warren.stages.exports import hf, llava, sharegpt
from warren.stages.exports.base import ExportError, ExportReport, StageFolder

EXPORTERS: dict[str, Callable[..., ExportReport]] = {
    llava.FORMAT: llava.export,
    sharegpt.FORMAT: sharegpt.export,
    hf.FORMAT: hf.export,
}


def export(
    src: str, format: str, dest: str, *, overwrite: bool = False, **options: Any
) -> ExportReport:
    """Export the kept rows of `src` (a stage or pipeline output folder) as `format` into `dest`."""
    exporter = EXPORTERS.get(format)
    if exporter is None:
        raise ExportError(
            f"unknown export format {format!r}; known formats: {', '.join(sorted(EXPORTERS))}"
        )
    return exporter(StageFolder.open(str(src)), str(dest), overwrite=overwrite, **options)


__all__ = ["EXPORTERS", "ExportError", "ExportReport", "StageFolder", "export"]
