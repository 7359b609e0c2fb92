"""embed_store: embeddings kept by content, so a dataset is embedded once whatever recipe or output
folder asks for it (`--embed.store PATH`; local or any pyarrow filesystem URI, e.g. s3://).

A vector is found by two keys. The content key is the first 16 bytes of the SHA-256 of the image's
bytes (or of the text's UTF-8). The spec key hashes everything that makes the vector what it is: the
model's name, the SHA-256 of its local weight files (a pretrained tag or hub id names fixed weights
itself), the image preprocessing (size, resize and crop mode, mean/std, interpolation, the decode
reduction), the tokenizer for texts, and the numeric path (fp32 on a CPU, fp16 autocast on CUDA:
they differ in the last bits). A different spec key is a different folder: changing the model or
the preprocessing never reads a vector made another way.

Layout (every file is written once, under a temporary name then renamed, with a unique name; no
file is ever appended to, so any number of actors on any number of nodes write at once):

    <store>/<spec key>/spec.json                 the spec, for people (not read back)
    <store>/<spec key>/<image|text>/<uuid>.emb   one batch's new vectors: MAGIC, a JSON header
                                                 (spec key, kind, dim, rows), the rows' keys
                                                 sorted (16 bytes each), then one fixed-size
                                                 record a row: key, float16 vector, CRC-32

Lookup cost. An actor indexes the keys of every file of its spec and kind once (two small ranged
reads a file: header and key block, never the vectors), then sees files other writers added by
listing the folder at most every REFRESH_SECONDS; its own writes it indexes at once. A batch's
lookup is then one binary search in memory, plus, for the hits, one ranged read per file holding
hits (a batch embedded before sits in one file: one read of its records) or one per hit when they
are scattered, READ_THREADS files at a time. Nothing else is read: never the whole store, never a
vector that is not wanted. Memory per actor: 24 bytes per stored key (key, file number, row), 24 MB
per million keys, capped at MAX_INDEX_KEYS (1.2 GB); files beyond the cap are not indexed and their
rows are computed again, never wrong. Measured by benchmarks/embed.py (1M keys of width 128 in
3,907 files of 256 rows, 2 cores under a load of ~20): indexed in 1.7 s (24 MB); a batch of 256
looked up in 3.6 ms when it was embedded before (71k keys/s), 9.3 ms when its hits are scattered
over 256 files (28k keys/s, the worst case), 0.3 ms when none is stored (780k keys/s).

Trust: a file whose header names another spec, kind or width, whose size is not what its header
says, that cannot be read, or whose record fails its checksum or holds a vector that is not finite,
is skipped with a warning and its rows are computed again; a hit's key is checked against the key
in the record read. The store is a cache: losing it costs time, never a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from warren.stages.base import stable_hash
from warren.stages.shards import TMP_PREFIX, Location

log = logging.getLogger(__name__)

KEY_BYTES = 16
FORMAT = 1
#: How often (seconds) an actor lists the store for files other writers added since.
REFRESH_SECONDS = 30.0
#: The most keys one actor indexes (about 24 bytes each).
MAX_INDEX_KEYS = 50_000_000
#: `--embed.store` values: the user's cache (default), or no store at all.
DEFAULT_STORE = "cache"
OFF = ("none", "off", "")
MAGIC = b"WARREN-EMB1\n"
SUFFIX = ".emb"
#: Files read at once for one batch's hits (object storage: one request each).
READ_THREADS = 8
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def default_store_path() -> str:
    """`$WARREN_CACHE/embeddings`, else `~/.cache/warren/embeddings` (beside the model cache)."""
    base = os.environ.get("WARREN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache/warren")
    return os.path.join(base, "embeddings")


def store_location(value: str) -> Location | None:
    """The store `--embed.store` names: `cache` (the default: `$WARREN_EMBED_STORE` when set,
    so a site or a test session can point every run elsewhere or turn it off, else the default
    path), `none`, a path or a URI."""
    value = value.strip()
    if value == DEFAULT_STORE:
        value = os.environ.get("WARREN_EMBED_STORE") or default_store_path()
    if value.lower() in OFF:
        return None
    return Location.of(value)


def content_keys(items: Sequence[bytes | memoryview | str]) -> list[bytes]:
    """The content key of each item: SHA-256 (first 16 bytes) of its bytes or its text's UTF-8."""
    return [
        hashlib.sha256(x.encode("utf-8") if isinstance(x, str) else x).digest()[:KEY_BYTES]
        for x in items
    ]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: str) -> str:
    st = os.stat(path)
    memo = (path, st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def weights_digest(spec: str) -> str:
    """SHA-256 of the local weight files a model spec names (a checkpoint file, or the weight files
    of a model directory), "" when it names none (a pretrained tag, a hub id, random weights: the
    spec itself then names the weights)."""
    path = spec.strip()
    for prefix in ("hf:", "open_clip:", "sscd:"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            if prefix == "open_clip:":
                path = path.split(":", 1)[1] if ":" in path else ""
    if not path or not os.path.exists(path):
        return ""
    if os.path.isfile(path):
        return _file_digest(path)
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if name.endswith(_WEIGHT_SUFFIXES) and not name.startswith(".")
    )
    return stable_hash({os.path.relpath(f, path): _file_digest(f) for f in files})


def _named_weights(model: Any, seed: int) -> str:
    """Weights no local file holds: a pretrained tag or hub id names them (with the hub's commit
    when known); random weights (`open_clip:<arch>`) are hashed, as torch versions may draw them
    differently from one seed."""
    module = getattr(model, "module", None)
    if model.name.startswith("open_clip:") and model.name.count(":") == 1:
        h = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"random (seed {seed}) {h.hexdigest()}"
    commit = getattr(getattr(module, "config", None), "_commit_hash", None)
    return f"named by the spec{f' (commit {commit})' if commit else ''}"


def describe(obj: Any) -> str:
    """A stable text of a preprocessing object (its repr without memory addresses)."""
    return _ADDRESS.sub("", " ".join(repr(obj).split()))


def model_spec(model: Any, spec: str, kind: str, reduce_to: int | None) -> dict[str, Any]:
    """What makes an embedding of `kind` ("image" or "text") by `model` what it is."""
    import torch

    from warren.stages.models import RANDOM_INIT_SEED

    digest = weights_digest(spec)
    out: dict[str, Any] = {
        "format": FORMAT,
        # Local weights are known by their content: a copy of a model folder is the same model.
        "model": f"{type(model).__name__} (local weights)" if digest else model.name,
        "dim": int(model.dim),
        # The layers and shapes: one architecture name may mean two configs (a test's tiny one).
        "architecture": stable_hash(describe(getattr(model, "module", None))),
        "weights": digest or _named_weights(model, RANDOM_INIT_SEED),
        "kind": kind,
        "numerics": "cuda fp16 autocast" if torch.device(model.device).type == "cuda" else "fp32",
        "stored": "float16",
    }
    if kind == "image":
        module = getattr(model, "module", None)
        cfg = getattr(getattr(module, "visual", None), "preprocess_cfg", None)
        processor = getattr(model, "image_processor", None)
        out["preprocess"] = {
            "cfg": cfg,
            "transform": describe(getattr(model, "preprocess", None)),
            "processor": processor.to_dict() if hasattr(processor, "to_dict") else None,
            "decode_reduce_to": reduce_to,
        }
    else:
        tok = getattr(model, "tokenizer", None)
        out["tokenizer"] = {
            "type": type(tok).__name__,
            "context_length": getattr(tok, "context_length", None),
            "name": getattr(tok, "name_or_path", None),
            "max_length": getattr(model, "max_length", None),
            "pad_to_max": getattr(model, "pad_to_max", None),
        }
    return out


class EmbeddingStore:
    """The vectors of one spec and kind in a store folder: `get` a batch's, `put` new ones."""

    def __init__(self, root: Location, spec: dict[str, Any], max_keys: int = MAX_INDEX_KEYS):
        self.spec = spec
        self.kind = spec["kind"]
        self.dim = int(spec["dim"])
        self.spec_key = stable_hash(spec)
        self.base = root.join(self.spec_key)
        self.folder = self.base.join(self.kind)
        self.max_keys = max_keys
        self._files: list[str] = []  # file number -> path
        self._seen: set[str] = set()  # every path listed (indexed, skipped or over the cap)
        self._keys = np.empty(0, dtype=f"S{KEY_BYTES}")  # sorted
        self._where = np.empty((0, 2), dtype=np.int32)  # (file number, row) of each key
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (keys, where) not merged yet
        self._listed_at = -np.inf
        self._spec_written = False
        self._io: ThreadPoolExecutor | None = None

    @property
    def indexed_keys(self) -> int:
        return len(self._keys) + sum(len(k) for k, _ in self._pending)

    def get(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float16 (n, dim), found bool (n,)): stored vectors of `keys`; a key not stored
        (or only in a file that turns out bad) is not found."""
        n = len(keys)
        vectors = np.zeros((n, self.dim), dtype=np.float16)
        found = np.zeros(n, dtype=bool)
        if n == 0:
            return vectors, found
        if time.monotonic() - self._listed_at > REFRESH_SECONDS:
            self._refresh()
        self._merge()
        if not len(self._keys):
            return vectors, found
        wanted = np.array(keys, dtype=f"S{KEY_BYTES}")
        pos = np.minimum(np.searchsorted(self._keys, wanted), len(self._keys) - 1)
        hit = self._keys[pos] == wanted
        by_file: dict[int, list[tuple[int, int]]] = {}
        for i in np.flatnonzero(hit):
            f, row = self._where[pos[i]]
            by_file.setdefault(int(f), []).append((int(i), int(row)))
        # One task per file: on object storage each read is a request, and they overlap.
        files = list(by_file.items())
        if self._io is None and len(files) > 1:
            self._io = ThreadPoolExecutor(max_workers=READ_THREADS)
        reads = (
            self._io.map(lambda fp: self._read_rows(self._files[fp[0]], fp[1]), files)
            if len(files) > 1
            else [self._read_rows(self._files[f], pairs) for f, pairs in files]
        )
        for (f, pairs), got in zip(files, reads, strict=True):
            if got is None:
                self._drop(self._files[f])
                continue
            at = np.array([i for i, _ in pairs])
            same = got[0] == wanted[at]  # the key read back, not only the index, says it is it
            vectors[at[same]] = got[1][same]
            found[at[same]] = True
        return vectors, found

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Write new (key, vector) rows as one new file; never fails the run (warns instead)."""
        if not len(keys):
            return
        arr = np.array(keys, dtype=f"S{KEY_BYTES}")
        arr, first = np.unique(arr, return_index=True)  # sorted, one row per key
        vecs = np.ascontiguousarray(np.asarray(vectors, dtype="<f2")[first])
        if vecs.shape != (len(arr), self.dim):
            raise ValueError(f"embed store: vectors {vecs.shape}, expected (n, {self.dim})")
        path = self.folder.join(f"{uuid.uuid4().hex}{SUFFIX}")
        try:
            if not self._spec_written:
                self.folder.mkdir()
                spec = self.base.join("spec.json")
                if not spec.exists():
                    spec.write_json_atomic(self.spec)
                self._spec_written = True
            path.write_bytes_atomic(self._encode(arr, vecs))
        except OSError as exc:
            log.warning("embed store: could not write %s (%s); continuing without", path.uri, exc)
            return
        self._add(path.path, arr)

    def _header(self, count: int) -> bytes:
        meta = json.dumps({"spec": self.spec_key, "kind": self.kind, "dim": self.dim, "n": count})
        return MAGIC + struct.pack("<I", len(meta)) + meta.encode()

    @property
    def _record_bytes(self) -> int:
        return KEY_BYTES + 2 * self.dim + 4

    @property
    def _record_dtype(self) -> np.dtype:
        return np.dtype([("key", f"S{KEY_BYTES}"), ("vec", "<f2", (self.dim,)), ("crc", "<u4")])

    def _encode(self, keys: np.ndarray, vecs: np.ndarray) -> bytes:
        """Header, the sorted keys, then one record per key: key, float16 vector, CRC-32."""
        body = bytearray()
        raw_keys = keys.tobytes()
        for j in range(len(keys)):
            rec = raw_keys[j * KEY_BYTES : (j + 1) * KEY_BYTES] + vecs[j].tobytes()
            body += rec + struct.pack("<I", zlib.crc32(rec))
        return self._header(len(keys)) + raw_keys + bytes(body)

    def _add(self, path: str, keys: np.ndarray) -> None:
        self._seen.add(path)
        if self.indexed_keys + len(keys) > self.max_keys:
            return
        where = np.empty((len(keys), 2), dtype=np.int32)
        where[:, 0] = len(self._files)
        where[:, 1] = np.arange(len(keys), dtype=np.int32)
        self._files.append(path)
        self._pending.append((keys, where))

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self._keys, *(k for k, _ in self._pending)])
        where = np.concatenate([self._where, *(w for _, w in self._pending)])
        order = np.argsort(keys, kind="stable")
        self._keys, self._where = keys[order], where[order]
        self._pending = []

    def _refresh(self) -> None:
        """Index the keys of files in the folder that this actor has not seen yet."""
        self._listed_at = time.monotonic()
        fs = self.folder.fs
        try:
            infos = fs.get_file_info(pafs.FileSelector(self.folder.path, allow_not_found=True))
        except OSError as exc:
            log.warning("embed store: cannot list %s (%s); computing", self.folder.uri, exc)
            return
        for info in sorted(infos, key=lambda i: i.path):
            name = info.path.rsplit("/", 1)[-1]
            if (
                info.type != pafs.FileType.File
                or info.path in self._seen
                or name.startswith((TMP_PREFIX, ".", "_"))
                or not name.endswith(SUFFIX)
            ):
                continue
            if self.indexed_keys >= self.max_keys:
                log.warning(
                    "embed store: %s holds more than %d keys; indexing no more (their rows are "
                    "computed again)",
                    self.folder.uri,
                    self.max_keys,
                )
                return
            keys = self._read_keys(info.path)
            if keys is None:
                self._seen.add(info.path)
                continue
            self._add(info.path, keys)

    def _layout(self, f: Any) -> tuple[int, int]:
        """(rows, offset of the keys) of an open store file, once its header says it is one of
        this store's; ValueError otherwise."""
        head = f.read_at(4096, 0)
        if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 4:
            raise ValueError("not an embedding store file")
        (size,) = struct.unpack_from("<I", head, len(MAGIC))
        start = len(MAGIC) + 4
        meta = json.loads(head[start : start + size] if start + size <= len(head) else b"")
        mine = {"spec": self.spec_key, "kind": self.kind, "dim": self.dim}
        if {k: meta.get(k) for k in mine} != mine:
            raise ValueError(f"header {meta} is not this store's ({mine})")
        return int(meta["n"]), start + size

    def _read_keys(self, path: str) -> np.ndarray | None:
        try:
            with self.folder.fs.open_input_file(path) as f:
                count, at = self._layout(f)
                raw = f.read_at(count * KEY_BYTES, at)
                if len(raw) != count * KEY_BYTES or f.size() != at + count * (
                    KEY_BYTES + self._record_bytes
                ):
                    raise ValueError(f"{f.size()} bytes, not the {count} rows its header says")
            return np.frombuffer(raw, dtype=f"S{KEY_BYTES}").copy()
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            log.warning("embed store: skipping %s (%s: %s)", path, type(exc).__name__, exc)
            return None

    def _read_rows(
        self, path: str, pairs: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(keys, vectors) of the rows of `pairs` ((_, row) each) in file `path`; None for a bad
        file."""
        size = self._record_bytes
        rows = [r for _, r in pairs]
        try:
            with self.folder.fs.open_input_file(path) as f:
                count, at = self._layout(f)
                first = at + count * KEY_BYTES
                lo, hi = min(rows), max(rows) + 1
                if hi - lo <= 4 * len(rows):  # dense (a batch embedded before): one read
                    span = f.read_at((hi - lo) * size, first + lo * size)
                    recs = [span[(r - lo) * size : (r - lo + 1) * size] for r in rows]
                else:
                    recs = [f.read_at(size, first + r * size) for r in rows]
            if any(len(rec) != size for rec in recs):
                raise ValueError("a record is cut short")
            table = np.frombuffer(b"".join(recs), dtype=self._record_dtype)
            crcs = [zlib.crc32(rec[:-4]) for rec in recs]
            if not np.array_equal(table["crc"], np.array(crcs, dtype=np.uint32)):
                raise ValueError("a record fails its checksum")
            vecs = table["vec"].astype(np.float16)
            if not np.isfinite(vecs).all():
                raise ValueError("a vector that is not finite")
            return table["key"], vecs
        except Exception as exc:  # noqa: BLE001 - any unreadable file is recomputed, never fatal
            log.warning("embed store: skipping %s (%s: %s)", path, type(exc).__name__, exc)
            return None

    def _drop(self, path: str) -> None:
        """Forget a bad file's keys (they are computed again)."""
        f = self._files.index(path)
        keep = self._where[:, 0] != f
        self._keys, self._where = self._keys[keep], self._where[keep]
