"""The source readers by format name, and `detect_format`: which reader an input needs.

A mixture spec reads its sources through these (`stages.readers.mixture`), so the mixture reader
itself is not among them: the package's `READERS` adds it (a spec's source is never a spec).
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs

from warren.stages.readers.base import InputError, Reader
from warren.stages.readers.coco import CocoReader, is_captions_file
from warren.stages.readers.columns import open_parquet_schema
from warren.stages.readers.download import TABLE_KINDS, DownloadReader, is_url_table
from warren.stages.readers.hf_datasets import HFDatasetsReader
from warren.stages.readers.image_folder import IMAGE_SUFFIXES, ImageFolderReader
from warren.stages.readers.img2dataset import Img2DatasetReader
from warren.stages.readers.llava_json import LlavaJsonReader, llama_factory_entries
from warren.stages.readers.parquet import ParquetReader
from warren.stages.shards import Location, list_files

SOURCE_READERS: dict[str, type[Reader]] = {
    cls.format: cls
    for cls in (
        ParquetReader,
        Img2DatasetReader,
        LlavaJsonReader,
        ImageFolderReader,
        HFDatasetsReader,
        CocoReader,
        DownloadReader,
    )
}
#: The format of a mixture spec (YAML), read by stages.readers.mixture.
MIXTURE_FORMAT = "mixture"

# Files only a `datasets` save_to_disk folder has; `dataset_info.json` alone is ambiguous (a
# LLaMA-Factory data folder has one too) and is looked into.
_HF_MARKERS = ("state.json", "dataset_dict.json")
_IMG2DATASET_COLUMNS = ("key", "status")


def _known() -> str:
    return ", ".join(sorted([*SOURCE_READERS, MIXTURE_FORMAT]))


def make_reader(
    readers: dict[str, type[Reader]], format: str | None, uri: str, **options: Any
) -> Reader:
    """The reader of `readers` for `format` (None or "auto": `detect_format(uri)`)."""
    if format in (None, "", "auto"):
        format = detect_format(uri)
    cls = readers.get(format)
    if cls is None:
        known = ", ".join(sorted(readers))
        raise InputError(f"unknown input format {format!r}; known formats: {known}")
    return cls(uri, **options)


def _parquet_format(fs: pafs.FileSystem, path: str) -> str:
    """img2dataset when the Parquet file has img2dataset's `key` and `status` columns; download
    when it is a URL table (a url column, no image column)."""
    schema, _ = open_parquet_schema("detect_format", fs, path)
    if all(c in schema.names for c in _IMG2DATASET_COLUMNS):
        return "img2dataset"
    return "download" if is_url_table(fs, path) else "parquet"


def detect_format(uri: str) -> str:
    """Guess the input format of `uri`:

    - `captions_*.json` file -> coco; other `*.json` / `*.jsonl` file -> llava_json;
      `*.yaml` / `*.yml` file -> mixture (a mixture spec, `stages.mixture_spec`);
      `*.parquet` file -> as a folder of one file; `*.tar` file -> img2dataset;
    - a URL table (`.parquet`, `.csv`, `.tsv`, JSON-lines `.jsonl`/`.json`; file or folder) with a
      `url`/`URL` column and no image column -> download (fetched with img2dataset);
    - folder with `state.json` or `dataset_dict.json` -> hf_datasets;
    - folder with a LLaMA-Factory `dataset_info.json` ({name: {"file_name": ...}}) -> llava_json
      (it reads the files the entries name); any other `dataset_info.json` -> hf_datasets;
    - folder with a top-level `llava.json` (warren's llava export: the JSON next to its image
      tree) -> llava_json;
    - folder with `*.tar` -> img2dataset;
    - folder of Parquet files -> img2dataset if they have `key` and `status` columns, else parquet;
    - folder with a `captions_*.json` (the COCO root, `annotations/` inside) -> coco;
    - folder of images -> image_folder; folder of JSON/JSONL files -> llava_json.
    """
    loc = Location.of(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{loc.uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        name = loc.path.lower()
        if is_captions_file(name):
            return "coco"
        if name.endswith((*TABLE_KINDS, ".json")) and is_url_table(loc.fs, loc.path):
            return "download"
        if name.endswith((".json", ".jsonl")):
            return "llava_json"
        if name.endswith((".yaml", ".yml")):
            return MIXTURE_FORMAT
        if name.endswith(".parquet"):
            return _parquet_format(loc.fs, loc.path)
        if name.endswith(".tar"):
            return "img2dataset"
        raise InputError(
            f"cannot detect the format of {loc.uri}; pass a format, one of: {_known()}"
        )
    if any(loc.join(m).exists() for m in _HF_MARKERS):
        return "hf_datasets"
    if loc.join("dataset_info.json").exists():
        return "llava_json" if llama_factory_entries(loc) is not None else "hf_datasets"
    if loc.join("llava.json").exists():
        return "llava_json"
    paths = [f.path.lower() for f in list_files(loc)]
    if any(p.endswith(".tar") for p in paths):
        return "img2dataset"
    parquets = [f.path for f in list_files(loc, (".parquet",))]
    if parquets:
        return _parquet_format(loc.fs, parquets[0])
    tables = [f.path for f in list_files(loc, (".csv", ".tsv", ".jsonl", ".json"))]
    if tables and is_url_table(loc.fs, tables[0]):
        return "download"
    # Before images: a COCO root holds both its image folders and annotations/captions_*.json.
    if any(is_captions_file(p) for p in paths):
        return "coco"
    if any(p.endswith(IMAGE_SUFFIXES) for p in paths):
        return "image_folder"
    if any(p.endswith((".json", ".jsonl")) for p in paths):
        return "llava_json"
    raise InputError(
        f"cannot detect the format of {loc.uri} (no .tar, .parquet, image or JSON files, no "
        f"save_to_disk folder); pass a format, one of: {_known()}"
    )
