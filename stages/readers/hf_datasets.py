"""Reader for a folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`.

A `Dataset` folder holds `data-NNNNN-of-NNNNN.arrow` files (Arrow IPC streams), `state.json` (the
file list, in order) and `dataset_info.json` (the features). The Arrow files are read as IPC
streams through the pyarrow filesystem, so local paths and s3:// etc. work; a unit is one file.
A `DatasetDict` folder (`dataset_dict.json` and one sub-folder per split) needs option `split`.

Columns are converted as for Parquet (`columns` mapping {canonical: source}, see
`stages.readers.parquet`): a column whose feature is `Image` or a sequence of `Image` becomes
`images` (the first such column, unless `columns` maps `images`); a role/content `messages`
column becomes `conversations` ({"from": "human" / "gpt" / "system", "value"}; TRL content parts
are concatenated with no separator, an image part becoming exactly `<image>`, so a warren `hf`
export reads back to the turns it was made from). Integer ids become strings, rows without an
id get a content-derived id, other columns are kept.

Common column names are recognised as in `stages.readers.parquet` (`text` -> `caption`, ...),
and a file whose columns do not map is refused with a message naming it and the option to give.

Options: `columns`, `split`, `source` (default: the folder name), `batch_size` (default 512).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from warren.stages.readers.base import InputError, Reader, ReadUnit
from warren.stages.readers.columns import (
    ColumnMapping,
    file_uri,
    finish,
    relative_key,
)
from warren.stages.shards import Location, list_files

READER = "hf_datasets"
_SEQUENCE_TYPES = ("Sequence", "List", "LargeList")


def _is_image_feature(feature: Any) -> bool:
    return isinstance(feature, dict) and feature.get("_type") == "Image"


def image_columns(features: Any) -> list[str]:
    """Names of columns whose `datasets` feature is `Image` or a sequence/list of `Image`."""
    if not isinstance(features, dict):
        return []
    out = []
    for name, feature in features.items():
        inner = None
        if isinstance(feature, list) and len(feature) == 1:
            inner = feature[0]
        elif isinstance(feature, dict) and feature.get("_type") in _SEQUENCE_TYPES:
            inner = feature.get("feature")
        if _is_image_feature(feature) or _is_image_feature(inner):
            out.append(name)
    return out


class HFDatasetsReader(Reader):
    """`save_to_disk` folders (Dataset, or one split of a DatasetDict)."""

    format = READER
    OPTIONS = ("columns", "split", "source", "batch_size")

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        self.mapping = ColumnMapping(self.format, options.get("columns"), aliases=True)

    def _dataset_root(self) -> Location:
        loc = self.location
        split = self.options.get("split")
        if not loc.is_dir():
            raise InputError(f"{self.format}: {loc.uri}: not a folder written by save_to_disk")
        if loc.join("dataset_dict.json").exists():
            try:
                splits = list(loc.join("dataset_dict.json").read_json()["splits"])
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise InputError(
                    f"{self.format}: {loc.uri}/dataset_dict.json: unreadable ({exc})"
                ) from exc
            if split is None:
                raise InputError(
                    f"{self.format}: {loc.uri} is a DatasetDict with splits {splits}; "
                    "pass option split=<name> to choose one"
                )
            if split not in splits:
                raise InputError(
                    f"{self.format}: {loc.uri}: no split {split!r}; splits are {splits}"
                )
            loc = loc.join(split)
        elif split is not None:
            raise InputError(
                f"{self.format}: {loc.uri} is a single Dataset (no dataset_dict.json); drop option split"
            )
        if not (loc.join("state.json").exists() or loc.join("dataset_info.json").exists()):
            raise InputError(
                f"{self.format}: {loc.uri}: not a datasets save_to_disk folder "
                "(no state.json, dataset_info.json or dataset_dict.json)"
            )
        return loc

    def _arrow_files(self, root: Location) -> list[str]:
        state = root.join("state.json")
        if state.exists():
            try:
                names = [d["filename"] for d in state.read_json()["_data_files"]]
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise InputError(f"{self.format}: {state.uri}: unreadable ({exc})") from exc
            paths = [root.join(n).path for n in names]
            for path in paths:
                if not Location(root.fs, path).exists():
                    raise InputError(
                        f"{self.format}: {file_uri(root.fs, path)}: listed in state.json but missing"
                    )
        else:
            paths = [f.path for f in list_files(root, (".arrow",), recursive=False)]
        if not paths:
            raise InputError(f"{self.format}: {root.uri}: no .arrow files")
        return paths

    def _image_hints(self, root: Location) -> list[str]:
        info = root.join("dataset_info.json")
        if not info.exists():
            return []
        try:
            return image_columns(info.read_json().get("features"))
        except (ValueError, OSError, AttributeError) as exc:
            raise InputError(f"{self.format}: {info.uri}: unreadable ({exc})") from exc

    def _schema(self, path: str) -> pa.Schema:
        fs = self.location.fs
        try:
            with fs.open_input_stream(path) as f:
                return pa.ipc.open_stream(f).schema
        except (OSError, pa.ArrowException) as exc:
            raise InputError(
                f"{self.format}: {file_uri(fs, path)}: not a readable Arrow IPC stream ({exc})"
            ) from exc

    def plan(self) -> list[ReadUnit]:
        root = self._dataset_root()
        hints = self._image_hints(root)
        units = []
        for path in self._arrow_files(root):
            schema = self._schema(path)
            hints = hints or _schema_image_hints(schema)
            self.mapping.resolve(schema, file_uri(root.fs, path), hints)
            units.append(
                ReadUnit(relative_key(self.location, path), path, {"image_columns": hints})
            )
        return units

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        fs = self.location.fs
        where = file_uri(fs, unit.path)
        with fs.open_input_stream(unit.path) as f:
            stream = pa.ipc.open_stream(f)
            hints = unit.options.get("image_columns") or _schema_image_hints(stream.schema)
            conversions = self.mapping.resolve(stream.schema, where, hints)
            offset = 0  # rows of the file before this slice: reasons name the file's row
            for batch in stream:
                for start in range(0, batch.num_rows, self.batch_size):
                    part = pa.Table.from_batches([batch.slice(start, self.batch_size)])
                    table = self.mapping.apply(part, conversions)
                    yield finish(
                        table, self.source, "source" in self.options, where, self.format, offset
                    )
                    offset += part.num_rows


def _schema_image_hints(schema: pa.Schema) -> list[str]:
    """Image columns from the `huggingface` schema metadata that `datasets` writes."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return []
    try:
        return image_columns(json.loads(raw).get("info", {}).get("features"))
    except (ValueError, AttributeError):
        return []
