"""Readers: turn an input format into canonical rows (see `stages.readers.base` for the contract).

    reader = get_reader("llava_json", "data/llava.json", image_root="data/images")
    for unit in reader.plan():          # on the driver: lists and checks the input
        for table in reader.read(unit):  # in a task: conformed tables with `_reject`
            ...

`get_reader(None, uri)` (or format "auto") guesses the format with `detect_format`.
"""

from __future__ import annotations

from typing import Any

from warren.stages.readers.base import InputError, Reader, ReadUnit
from warren.stages.readers.coco import CocoReader
from warren.stages.readers.download import DownloadReader
from warren.stages.readers.hf_datasets import HFDatasetsReader
from warren.stages.readers.image_folder import ImageFolderReader
from warren.stages.readers.img2dataset import Img2DatasetReader
from warren.stages.readers.llava_json import LlavaJsonReader
from warren.stages.readers.mixture import MixtureReader
from warren.stages.readers.parquet import ParquetReader
from warren.stages.readers.registry import SOURCE_READERS, detect_format, make_reader

READERS: dict[str, type[Reader]] = {**SOURCE_READERS, MixtureReader.format: MixtureReader}

__all__ = [
    "READERS",
    "CocoReader",
    "DownloadReader",
    "HFDatasetsReader",
    "ImageFolderReader",
    "Img2DatasetReader",
    "InputError",
    "LlavaJsonReader",
    "MixtureReader",
    "ParquetReader",
    "ReadUnit",
    "Reader",
    "detect_format",
    "get_reader",
]


def get_reader(format: str | None, uri: str, **options: Any) -> Reader:
    """The reader for `format` (None or "auto": `detect_format(uri)`), built with `options`."""
    return make_reader(READERS, format, uri, **options)
