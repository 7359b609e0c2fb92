"""One img2dataset shard job, run in this process: its options (img2dataset's names and defaults,
checked), its input (the unit's URL list as Feather), the job itself (fetch, resize, filter,
write), the mark of a finished shard, and the rejection reasons of the URLs it could not fetch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# img2dataset imports albumentations, which asks PyPI for a newer version on import unless told
# not to: set before any import of img2dataset, here and (inherited) in every Ray worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.readers.base import InputError, positive_int_option
from warren.stages.shards import Location

# Names img2dataset writes itself (its arguments_validator refuses them as additional columns).
IMG2DATASET_RESERVED = (
    "key",
    "caption",
    "url",
    "width",
    "height",
    "original_width",
    "original_height",
    "status",
    "error_message",
    "exif",
    "md5",
    "sha256",
    "sha512",
)
URL_LIST = "urls.feather"
JOB_INPUT = "_job_input.feather"
SHARD = "00000"  # a unit is exactly one img2dataset shard (shard id 0, oom_shard_count 5)
DOWNLOADS = "_downloads"

# img2dataset's parameters exposed as options, with its defaults (thread_count: see the docstring).
IMG2DATASET_DEFAULTS: dict[str, Any] = {
    "image_size": 256,
    "resize_mode": "border",
    "resize_only_if_bigger": False,
    "upscale_interpolation": "lanczos",
    "downscale_interpolation": "area",
    "min_image_size": 0,
    "max_image_area": None,
    "max_aspect_ratio": None,
    "encode_format": "jpg",
    "encode_quality": 95,
    "skip_reencode": False,
    "disable_all_reencoding": False,
    "retries": 0,
    "timeout": 10,
    "thread_count": 64,
    "user_agent_token": None,
    "disallowed_header_directives": ["noai", "noimageai", "noindex", "noimageindex"],
    "compute_hash": "sha256",
}
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
DEFAULT_ROWS_PER_SHARD = 10_000

# img2dataset error message -> error type, first match wins (vectorised with Arrow regexes).
ERROR_TYPES: tuple[tuple[str, str], ...] = (
    (r"X-Robots-Tag", "opt-out header"),
    (r"(?i)timed? ?out", "timeout"),
    (r"(?i)\bssl\b|certificate", "ssl error"),
    (r"(?i)unknown url type|no host given|invalid url|url can't contain", "bad url"),
    (
        r"(?i)connection|errno|name or service|nodename|remote end closed|"
        r"incompleteread|network is unreachable|no route to host|temporary failure",
        "connection error",
    ),
    (r"Image decoding error|cannot identify image", "decode error"),
    (r"image too small", "too small"),
    (r"image area too large", "too large"),
    (r"aspect ratio too large", "aspect ratio"),
    (r"hash mismatch", "hash mismatch"),
)
_HTTP_CODE = r"HTTP Error (?P<code>\d{3})"


def error_types(messages: pa.Array) -> pa.Array:
    """A short, normalised category per img2dataset error message (null stays null)."""
    messages = pc.cast(messages, pa.string())
    out = pa.nulls(len(messages), pa.string())
    code = pc.struct_field(pc.extract_regex(messages, _HTTP_CODE), "code")
    out = pc.if_else(pc.is_valid(code), pc.binary_join_element_wise("http ", code, ""), out)
    for pattern, category in ERROR_TYPES:
        hit = pc.fill_null(pc.match_substring_regex(messages, pattern), False)
        out = pc.if_else(pc.and_(hit, pc.is_null(out)), category, out)
    return pc.if_else(pc.is_valid(messages), pc.fill_null(out, "other"), out)


def download_reasons(status: pa.Array, error_message: pa.Array | None, url: pa.Array) -> pa.Array:
    """`download: <error type> (<url>: <error message>)` where status != "success", else null."""
    status = pc.cast(status, pa.string())
    message = status if error_message is None else pc.coalesce(error_message, status)
    message = pc.fill_null(pc.cast(message, pa.string()), "unknown error")
    kinds = error_types(message)
    url = pc.fill_null(pc.cast(url, pa.string()), "")
    reasons = pc.binary_join_element_wise("download: ", kinds, " (", url, ": ", message, ")", "")
    failed = pc.fill_null(pc.not_equal(status, "success"), True)
    return pc.if_else(failed, reasons, pa.scalar(None, pa.string()))


def url_list(chunk: pa.Table, url_col: str, caption_col: str | None, extras: list[str]) -> pa.Table:
    """img2dataset's shard input: the extra columns, then `caption`, then `url` (its column_list)."""
    columns = {c: chunk.column(c) for c in extras}
    if caption_col is not None:
        columns["caption"] = pc.cast(chunk.column(caption_col), pa.string())
    columns["url"] = pc.cast(chunk.column(url_col), pa.string())
    return pa.table(columns).combine_chunks()


def feather_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def shard_complete(folder: Location) -> bool:
    """img2dataset wrote the shard's stats last (its incremental mode's marker) and the shard."""
    return folder.join(f"{SHARD}_stats.json").exists() and folder.join(f"{SHARD}.parquet").exists()


def run_img2dataset(
    folder: Location, params: Mapping[str, Any], unit: Mapping[str, Any], rows_per_shard: int
) -> None:
    """One img2dataset shard job in this process: fetch, resize, filter and write the unit."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    for name in (f"{SHARD}.parquet", f"{SHARD}_stats.json"):
        target = folder.join(name)
        if target.exists():
            folder.fs.delete_file(target.path)
    inf = float("inf")
    resizer = Resizer(
        image_size=params["image_size"],
        resize_mode=params["resize_mode"],
        resize_only_if_bigger=params["resize_only_if_bigger"],
        upscale_interpolation=params["upscale_interpolation"],
        downscale_interpolation=params["downscale_interpolation"],
        encode_quality=params["encode_quality"],
        encode_format=params["encode_format"],
        skip_reencode=params["skip_reencode"],
        disable_all_reencoding=params["disable_all_reencoding"],
        min_image_size=params["min_image_size"],
        max_image_area=inf if params["max_image_area"] is None else params["max_image_area"],
        max_aspect_ratio=inf if params["max_aspect_ratio"] is None else params["max_aspect_ratio"],
        blurrer=None,
    )
    directives = params["disallowed_header_directives"]
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=resizer,
        thread_count=params["thread_count"],
        save_caption=bool(unit.get("caption")),
        # EXIF JSON would ride on every downstream shard, and no stage reads it.
        extract_exif=False,
        output_folder=folder.uri,
        column_list=list(unit["columns"]),
        timeout=params["timeout"],
        number_sample_per_shard=rows_per_shard,
        oom_shard_count=5,
        compute_hash=params["compute_hash"],
        verify_hash_type=None,
        encode_format=params["encode_format"],
        retries=params["retries"],
        user_agent_token=params["user_agent_token"],
        disallowed_header_directives=directives or None,
    )
    # img2dataset deletes its shard input when the shard is done (it is a temporary file in its
    # own runs); give it a copy, so the unit can be fetched again after its output is deleted.
    job_input = folder.join(JOB_INPUT)
    job_input.write_bytes_atomic(folder.join(URL_LIST).read_bytes())
    # download_shard, not __call__: __call__ prints and swallows the error; we want the task to
    # fail with it (the ingest then resumes at this unit).
    downloader.download_shard((0, job_input.uri))


def img2dataset_params(reader: str, options: Mapping[str, Any]) -> dict[str, Any]:
    params = {k: options.get(k, v) for k, v in IMG2DATASET_DEFAULTS.items()}
    for name in ("image_size", "thread_count", "timeout"):
        params[name] = positive_int_option(reader, options, name, IMG2DATASET_DEFAULTS[name])
    for name in ("min_image_size", "retries", "encode_quality"):
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{reader}: option {name} must be an integer >= 0, got {value!r}")
    for name in ("max_image_area", "max_aspect_ratio"):
        value = params[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{reader}: option {name} must be a number or null, got {value!r}")
    for name in ("resize_only_if_bigger", "skip_reencode", "disable_all_reencoding"):
        if not isinstance(params[name], bool):
            raise InputError(f"{reader}: option {name} must be true or false")
    if params["resize_mode"] not in RESIZE_MODES:
        raise InputError(f"{reader}: option resize_mode must be one of {', '.join(RESIZE_MODES)}")
    if params["encode_format"] not in ENCODE_FORMATS:
        raise InputError(
            f"{reader}: option encode_format must be one of {', '.join(ENCODE_FORMATS)}"
        )
    if params["compute_hash"] not in (None, "md5", "sha256", "sha512"):
        raise InputError(f"{reader}: option compute_hash must be md5, sha256, sha512 or null")
    directives = params["disallowed_header_directives"]
    if not isinstance(directives, list) or not all(isinstance(d, str) for d in directives):
        raise InputError(f"{reader}: option disallowed_header_directives must be a list of strings")
    return params
