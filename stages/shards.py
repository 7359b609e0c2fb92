"""Shard I/O: resolve local paths and pyarrow filesystem URIs, list Parquet shards, write atomically."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it; built from a local path or a URI (s3://, gs://, file://)."""

    fs: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, uri: str | os.PathLike) -> Location:
        uri = str(uri)
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
            return cls(fs, path.rstrip("/") or "/")
        return cls(pafs.LocalFileSystem(), os.path.abspath(uri))

    def join(self, *parts: str) -> Location:
        return Location(self.fs, "/".join([self.path.rstrip("/"), *parts]))

    @property
    def uri(self) -> str:
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self.path
        return f"{self.fs.type_name}://{self.path}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def rmtree(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_json(self):
        return json.loads(self.read_bytes())

    def write_bytes_atomic(self, data: bytes) -> None:
        parent = self.path.rsplit("/", 1)[0]
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path)

    def write_json_atomic(self, obj) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def list_files(
    loc: Location, suffixes: tuple[str, ...] | None = None, recursive: bool = True
) -> list[pafs.FileInfo]:
    """Files under `loc` (sorted by path), skipping hidden and temporary names."""
    if not loc.exists():
        raise FileNotFoundError(f"{loc.uri}: no such file or directory")
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.File:
        return [info]
    sel = pafs.FileSelector(loc.path, recursive=recursive)
    out = []
    for fi in loc.fs.get_file_info(sel):
        if fi.type != pafs.FileType.File:
            continue
        rel = fi.path[len(loc.path) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if suffixes and not fi.path.lower().endswith(suffixes):
            continue
        out.append(fi)
    return sorted(out, key=lambda f: f.path)


def list_shards(loc: Location) -> list[str]:
    """Parquet shard paths directly in a stage folder (not in rejected/ or hidden folders)."""
    if not loc.exists():
        return []
    return [f.path for f in list_files(loc, (".parquet",), recursive=False)]


def write_table_atomic(table: pa.Table, loc: Location) -> int:
    """Write a Parquet file under a temporary name and rename it, so readers never see half a file.

    Returns the bytes written.
    """
    parent = loc.path.rsplit("/", 1)[0]
    tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}.parquet"
    with loc.fs.open_output_stream(tmp) as sink:
        pq.write_table(
            table, sink, compression="zstd", row_group_size=max(1, min(table.num_rows, 4096))
        )
    loc.fs.move(tmp, loc.path)
    return loc.fs.get_file_info(loc.path).size


def parquet_row_count(fs: pafs.FileSystem, path: str) -> int:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def remove_temporaries(loc: Location) -> None:
    """Delete leftovers of writes that were interrupted (a kill between write and rename)."""
    if not loc.exists():
        return
    for fi in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)):
        if fi.type == pafs.FileType.File and fi.base_name.startswith(TMP_PREFIX):
            loc.fs.delete_file(fi.path)
