"""Reader for LLaVA-style instruction data: a JSON list (or JSONL) of items plus an image folder.

Each item is `{"id": ..., "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] | absent,
"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}`. ShareGPT-style items
with `images` (a list) and role/content turns (LLaMA-Factory, TRL) are accepted as well, and
Alpaca-style text items `{"instruction", "input", "output"}` (WizardLM evol-instruct) become one
question (the instruction, then the input after a blank line when there is one) and its answer.

- Integer ids become strings; an item without an id gets a content-derived id (image bytes and
  conversations, see `row_content_id`).
- `source`: the reader option wins over everything (the user said so); else an item's own string
  `source` key (warren's exports write it, so an export reads back with each row's source); else
  the file name. String `caption`, `url` and `license` keys are read as well.
- A LLaMA-Factory data folder (a `dataset_info.json` mapping dataset names to
  `{"file_name": ..., "formatting": "sharegpt", ...}`, as warren's sharegpt export writes) is read
  through that file: exactly the JSON files its entries name, in order (`dataset_info.json` itself
  is never taken as data), with image paths relative to the folder, LLaMA-Factory's
  `dataset_dir`. Entries that are not sharegpt-formatted `messages`/`conversations` plus
  `images` are an InputError.
- Image paths are relative to option `image_root` (default: the folder holding the JSON file; any
  local path or pyarrow filesystem URI). `images[].path` is the normalised relative path and
  `images[].bytes` the file's bytes. Text-only items get `images = []`.
- Turns follow `stages.conversation` (applied by `finish`, as for every reader): role aliases
  normalised, a missing `<image>` marker inserted, each edit recorded in `edits`, and an invalid
  conversation (starting with the model's turn, not alternating, empty turns, unknown roles,
  markers != images) rejected as `llava_json: <reason>`.
- Record-level isolation: an item that cannot be represented is a rejected row naming the file
  (relative to the input) and the record (`record N` of a JSON list, counted from 1, or `line N`
  of JSONL), and the rest of the file goes on. Reasons (first rule that fired):
  `llava_json: malformed item (x.jsonl line 2: invalid JSON ...)`,
  `llava_json: bad record (x.json record 17: conversations[1].value is not valid UTF-8: lone
  surrogate)` (valid JSON, but Arrow strings are UTF-8), `llava_json: bad record (... caption is
  int, expected a string)`, `llava_json: malformed turn (x.json record 3: turn 1 value is int,
  expected a string)`, `llava_json: image path escapes root (<path>)`,
  `llava_json: image not found (<path>)`, `llava_json: image unreadable (...)`. A rejected row
  keeps its id (or a content id) and what could be read (turns, images found; a lone surrogate
  read as U+FFFD).

A unit is one JSON file. A JSON list is parsed whole (`json.loads`), so its memory is the size of
the file several times over; JSONL is streamed line by line. `plan()` fails early on a file that
cannot be read or does not start like JSON, and parses files up to `VALIDATE_MAX_BYTES` to report
syntax errors before any work starts; a larger invalid JSON list fails in `read` with an
`InputError` naming the file.

Options: `image_root`, `source` (default: each item's `source`, else the file name), `batch_size`
(rows per table, default 256).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from warren.stages.readers.base import InputError, Reader, ReadUnit
from warren.stages.readers.columns import (
    ROLE_TO_FROM,
    file_uri,
    finish,
    list_input_files,
    relative_key,
    row_content_id,
    table_from_rows,
)
from warren.stages.readers.records import first_bad_text, replace_bad_text
from warren.stages.schema import REJECT_COLUMN, content_id
from warren.stages.shards import Location, list_files

READER = "llava_json"
DATASET_INFO = "dataset_info.json"
VALIDATE_MAX_BYTES = 64 << 20
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class _Rejected(Exception):
    """An item that cannot become a canonical row; the message is the reason."""


def safe_relative_path(path: str) -> str | None:
    """The normalised relative path, or None when `path` is absolute, a URL or leaves the root."""
    p = path.replace("\\", "/")
    if not p or p.startswith("/") or "://" in p or _WINDOWS_DRIVE.match(p):
        return None
    norm = posixpath.normpath(p)
    if norm in (".", "..") or norm.startswith("../"):
        return None
    return norm


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class LlavaJsonReader(Reader):
    """LLaVA JSON / JSONL file (or a folder of them) with images under `image_root`."""

    format = READER
    OPTIONS = ("image_root", "source", "batch_size")
    DEFAULT_BATCH_SIZE = 256

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        root = options.get("image_root")
        if root is not None and not isinstance(root, str):
            root = str(root)
        self.image_root = Location.of(root) if root else None

    # ---------------------------------------------------------------- plan

    def _root_for(self, unit: ReadUnit) -> Location:
        if self.image_root is not None:
            return self.image_root
        if "root" in unit.options:  # a LLaMA-Factory folder: paths are relative to the folder
            return Location(self.location.fs, unit.options["root"])
        return Location(self.location.fs, unit.path.rsplit("/", 1)[0] or "/")

    def plan(self) -> list[ReadUnit]:
        entries = llama_factory_entries(self.location)
        if entries is not None:
            files = self._llama_factory_files(entries)
            options = {"root": self.location.path}
        else:
            files = list_input_files(self.format, self.location, (".json", ".jsonl"), "JSON files")
            options = {}
        if self.image_root is not None and not self.image_root.is_dir():
            raise InputError(f"{self.format}: image_root {self.image_root.uri} is not a directory")
        fs = self.location.fs
        units = []
        for info in files:
            where = file_uri(fs, info.path)
            try:
                with fs.open_input_stream(info.path) as f:
                    head = f.read(4096)
            except OSError as exc:
                raise InputError(f"{self.format}: {where}: cannot read ({exc})") from exc
            start = _first_char(head)
            if start not in (b"[", b"{"):
                raise InputError(f"{self.format}: {where}: not JSON (starts with {head[:20]!r})")
            if start == b"[" and info.size is not None and info.size <= VALIDATE_MAX_BYTES:
                self._parse_list(info.path)
            units.append(ReadUnit(relative_key(self.location, info.path), info.path, options))
        return units

    def _llama_factory_files(self, entries: dict[str, dict]) -> list[pafs.FileInfo]:
        """The local JSON files a LLaMA-Factory `dataset_info.json` names, in its order.

        Only sharegpt-formatted entries whose messages are in `conversations` or `messages` and
        whose images are in `images` can be read as LLaVA-style items; anything else is an
        InputError naming the entry, never a silently skipped dataset.
        """
        fs = self.location.fs
        where = self.location.join(DATASET_INFO).uri
        paths: list[str] = []
        for name, entry in entries.items():
            if not isinstance(entry.get("file_name"), str):
                raise InputError(
                    f"{self.format}: {where}: entry {name!r} has no local file_name "
                    "(hub and script datasets cannot be read here)"
                )
            columns = entry.get("columns") or {}
            if (
                entry.get("formatting") != "sharegpt"
                or entry.get("ranking")
                or columns.get("messages", "conversations") not in ("conversations", "messages")
                or columns.get("images", "images") != "images"
                or set(columns) - {"messages", "images"}
            ):
                raise InputError(
                    f"{self.format}: {where}: entry {name!r} is not a sharegpt dataset with "
                    "messages in 'conversations' or 'messages' and images in 'images'; only those "
                    "can be read"
                )
            rel = safe_relative_path(entry["file_name"])
            if rel is None:
                raise InputError(
                    f"{self.format}: {where}: entry {name!r} file_name {entry['file_name']!r} "
                    "is outside the folder"
                )
            target = self.location.join(rel)
            if target.is_dir():
                found = [f.path for f in list_files(target, (".json", ".jsonl"))]
            elif target.exists():
                found = [target.path]
            else:
                raise InputError(f"{self.format}: {target.uri}: named in {where} but missing")
            paths += [p for p in found if p not in paths]
        if not paths:
            raise InputError(f"{self.format}: {where}: names no dataset files")
        return [fs.get_file_info(p) for p in paths]

    def _parse_list(self, path: str) -> list:
        where = file_uri(self.location.fs, path)
        try:
            items = json.loads(Location(self.location.fs, path).read_bytes())
        except (ValueError, OSError) as exc:
            raise InputError(f"{self.format}: {where}: invalid JSON ({exc})") from exc
        if not isinstance(items, list):
            raise InputError(
                f"{self.format}: {where}: expected a JSON list of items, got {_type_name(items)}"
            )
        return items

    # ---------------------------------------------------------------- read

    def _items(self, path: str) -> Iterator[tuple[str, Any, str | None]]:
        """(record label, item, parse error): a JSON list whole (`record N`, counted from 1),
        JSONL line by line (`line N`)."""
        fs = self.location.fs
        with fs.open_input_stream(path) as f:
            head = f.read(4096)
        if _first_char(head) == b"[":
            for number, item in enumerate(self._parse_list(path), 1):
                yield f"record {number}", item, None
            return
        with fs.open_input_stream(path) as f:
            buffer = b""
            number = 0
            while True:
                chunk = f.read(1 << 20)
                if chunk:
                    buffer += chunk
                lines = buffer.split(b"\n")
                buffer = lines.pop() if chunk else b""
                for line in lines:
                    number += 1
                    if not line.strip():
                        continue
                    try:
                        yield f"line {number}", json.loads(line), None
                    except ValueError as exc:
                        yield (
                            f"line {number}",
                            line.decode("utf-8", "replace"),
                            f"invalid JSON ({exc})",
                        )
                if not chunk:
                    break

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        root = self._root_for(unit)
        where = file_uri(self.location.fs, unit.path)
        rows: list[dict] = []
        override = "source" in self.options
        for record, item, error in self._items(unit.path):
            rows.append(self._row(item, error, root, f"{unit.key} {record}"))
            if len(rows) >= self.batch_size:
                yield finish(
                    table_from_rows(rows, reader=READER), self.source, override, where, READER
                )
                rows = []
        if rows:
            yield finish(table_from_rows(rows, reader=READER), self.source, override, where, READER)

    def _row(self, item: Any, error: str | None, root: Location, record: str) -> dict:
        """One item as a row; `record` ("sub/x.jsonl line 17") names it in a rejection."""
        bad_text = first_bad_text(item)
        if bad_text is not None:
            # Valid JSON, but a lone UTF-16 surrogate cannot be UTF-8 (Arrow strings are): the
            # row is rejected, and keeps what can be read with U+FFFD in place of the surrogate.
            item = replace_bad_text(item)
        if error is not None or not isinstance(item, dict):
            detail = error or f"item is {_type_name(item)}, expected an object"
            raw = item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)
            return {
                "id": content_id(raw),
                "images": [],
                REJECT_COLUMN: f"{READER}: malformed item ({record}: {detail})",
            }
        row: dict[str, Any] = {"images": [], "_record": record}
        # An item's own `source` (a warren export writes it) wins over the file-name default;
        # the reader's `source` option wins over both (`finish` applies it).
        wrong = None
        for name in ("caption", "url", "license", "source"):
            value = item.get(name)
            if isinstance(value, str):
                row[name] = value
            elif value is not None and wrong is None:
                wrong = f"{name} is {_type_name(value)}, expected a string"
        try:
            row["id"] = self._id(item, record)
            turns = _turns(item, record)
            row["conversations"] = turns
            paths = _image_paths(item, record)
            row["images"] = [{"bytes": None, "path": p} for p in paths]
            for i, p in enumerate(paths):
                rel = safe_relative_path(p)
                if rel is None:
                    raise _Rejected(f"image path escapes root ({p})")
                row["images"][i] = {"bytes": _read_image(root, rel, p), "path": rel}
            # last, so the rejected row keeps the turns and images that could be read
            if bad_text is not None:
                raise _Rejected(
                    f"bad record ({record}: {bad_text} is not valid UTF-8: lone surrogate)"
                )
            if wrong is not None:
                raise _Rejected(f"bad record ({record}: {wrong})")
        except _Rejected as exc:
            row[REJECT_COLUMN] = f"{READER}: {exc}"
        if row.get("id") is None:
            row["id"] = row_content_id(row["images"], row.get("caption"), row.get("conversations"))
        return row

    @staticmethod
    def _id(item: dict, record: str) -> str | None:
        value = item.get("id")
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise _Rejected(
            f"malformed item ({record}: id is {_type_name(value)}, expected a string or integer)"
        )


def llama_factory_entries(location: Location) -> dict[str, dict] | None:
    """The entries of a LLaMA-Factory data folder's `dataset_info.json` ({name: {"file_name": ...,
    ...}}), or None when `location` is not a folder with one. A `datasets` save_to_disk folder
    has a `dataset_info.json` too, but it describes one dataset (`features`, `citation`, ...)."""
    info = location.join(DATASET_INFO)
    if not location.is_dir() or not info.exists():
        return None
    try:
        entries = info.read_json()
    except (ValueError, OSError):
        return None
    if not isinstance(entries, dict) or not entries:
        return None
    if not all(isinstance(v, dict) for v in entries.values()):
        return None
    if not any(isinstance(v.get("file_name"), str) for v in entries.values()):
        return None
    return entries


def _first_char(head: bytes) -> bytes:
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]


def _read_image(root: Location, rel: str, original: str) -> bytes:
    try:
        return root.join(rel).read_bytes()
    except FileNotFoundError as exc:
        raise _Rejected(f"image not found ({original})") from exc
    except OSError as exc:
        raise _Rejected(f"image unreadable ({original}: {exc})") from exc


def _image_paths(item: dict, record: str) -> list[str]:
    key = "image" if item.get("image") is not None else "images"
    value = item.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Rejected(f"malformed item ({record}: {key} must be a path or a list of paths)")
    if any(not v for v in value):
        raise _Rejected(f"malformed item ({record}: empty {key} path)")
    return value


def _turns(item: dict, record: str) -> list[dict] | None:
    """The item's turns as {from, value}; role/content turns are mapped (user -> human, ...)."""
    key = "conversations" if "conversations" in item else "messages"
    raw = item.get(key)
    if raw is None and "instruction" in item and "output" in item:
        return _alpaca_turns(item, record)
    if raw is None:
        if isinstance(item.get("caption"), str):
            return None
        raise _Rejected(f"malformed item ({record}: no conversations and no caption)")
    if not isinstance(raw, list) or not raw:
        what = _type_name(raw) if raw != [] else "empty"
        raise _Rejected(f"malformed item ({record}: {key} is {what})")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise _Rejected(
                f"malformed turn ({record}: turn {i + 1} is {_type_name(turn)}, expected an object)"
            )
        if "from" in turn or "value" in turn:
            speaker, value = turn.get("from"), turn.get("value")
        else:
            speaker, value = turn.get("role"), turn.get("content")
            speaker = ROLE_TO_FROM.get(speaker, speaker) if isinstance(speaker, str) else speaker
        if not isinstance(speaker, str):
            raise _Rejected(
                f"malformed turn ({record}: turn {i + 1} speaker is {_type_name(speaker)}, "
                "expected a string)"
            )
        if not isinstance(value, str):
            raise _Rejected(
                f"malformed turn ({record}: turn {i + 1} value is {_type_name(value)}, "
                "expected a string)"
            )
        turns.append({"from": speaker, "value": value})
    return turns


def _alpaca_turns(item: dict, record: str) -> list[dict]:
    """Alpaca-style `{"instruction", "input", "output"}` (WizardLM evol-instruct, Alpaca) as one
    question and answer; a non-empty `input` follows the instruction after a blank line, as in
    Alpaca's own prompt."""
    parts = {k: item.get(k, "") for k in ("instruction", "input", "output")}
    bad = [k for k, v in parts.items() if not isinstance(v, str)]
    if bad:
        raise _Rejected(
            f"malformed item ({record}: {bad[0]} is {_type_name(parts[bad[0]])}, expected a string)"
        )
    question = parts["instruction"]
    if parts["input"].strip():
        question = f"{question}\n\n{parts['input']}"
    return [{"from": "human", "value": question}, {"from": "gpt", "value": parts["output"]}]
