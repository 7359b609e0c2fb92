"""Mixture specs: a small YAML file that names the sources of a training mixture and how to mix them.

    name: llava_v1_5_mix665k          # names the output folder (warren-out/<name>) and the export
    seed: 0                           # seed of every sampling decision (balance.seed unless set)
    sources:                          # in order; each name becomes the rows' `source`
      llava_instruct_158k:
        path: ${LLAVA_DATA}/llava_instruct_150k.json   # ${VAR}: environment; relative: to this file
        format: llava_json            # optional: detected from the path (see stages.readers)
        options: {image_root: ${COCO}/train2017}       # reader options
        task: conversation            # optional: the rows' `task` (default: inferred, see below)
        filter: "n_images > 0"        # optional: rows failing it are rejected (stages.source_filter)
        cap: 157712                   # optional: keep at most this many rows (balance.source_caps)
        weight: 1.0                   # optional: sampling weight with a total (balance.source_weights)
        short_answer: true            # optional: add the short-answer instruction to its questions
    balance: {total: 665000, alpha: 0.5, text_share: 0.06}   # any balance parameter
    short_answer: {max_words: 3}      # any short_answer parameter but `sources`
    export_check: {}                  # any export_check parameter
    export: {format: llava, to: exports/mix665k}             # optional: written after the run
    #   (also: name, overwrite, caption_template; see stages.exports)

Source paths that are relative are relative to the spec's folder (data lives next to its spec);
`output` and `export.to` are relative to the working directory, like `--output`.

A source `path` is any input a reader takes (a JSON file, a Parquet folder, a `datasets` folder,
...) or an earlier warren output: a pipeline output folder (its `run.json` names the final stage,
whose kept rows are read) or one stage folder (the kept shards its `_manifest.json` lists).

The rows' `task` is the source's `task` when given, else inferred per row (`infer_tasks`):
`text-only` (turns, no image), `caption` (no turns), `single-turn` (one question and answer) or
`multi-turn`. Ids are prefixed with `<source>/` (`prefix_ids: false` at the top level keeps them
as they are) because sources often reuse ids (COCO image ids appear in several VQA sets), and
balancing and exports need them unique.

Every mistake in a spec is a `SpecError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from warren.stages.shards import Location

SOURCE_KEYS = ("path", "format", "options", "task", "filter", "cap", "weight", "short_answer")
TOP_KEYS = (
    "name",
    "description",
    "seed",
    "output",
    "prefix_ids",
    "sources",
    "balance",
    "short_answer",
    "export_check",
    "export",
)
EXPORT_KEYS = ("format", "to", "name", "overwrite", "caption_template")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SpecError(ValueError):
    """A mixture spec that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    format: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    task: str | None = None
    filter: str | None = None
    cap: int | None = None
    weight: float | None = None
    short_answer: bool = False


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    uri: str
    name: str
    sources: tuple[SourceSpec, ...]
    description: str = ""
    seed: int = 0
    output: str | None = None
    prefix_ids: bool = True
    balance: dict = dataclasses.field(default_factory=dict)
    short_answer: dict = dataclasses.field(default_factory=dict)
    export_check: dict = dataclasses.field(default_factory=dict)
    export: dict | None = None


def _expand(value: Any, where: str) -> Any:
    """${VAR} from the environment in every string of `value`; an unset variable is an error."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise SpecError(f"{where}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    return value


def _base_of(uri: str) -> str:
    if "://" in uri:
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def _resolve(path: str, base: str) -> str:
    """A path relative to the spec's folder, unless it is absolute or a URI."""
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.normpath(os.path.join(base, path))


def _check_keys(where: str, got: Mapping, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(got) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known: {', '.join(allowed)}")


def _mapping(where: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def parse_spec(text: str, uri: str = "<spec>") -> MixtureSpec:
    """The spec in `text` (YAML); `uri` names it in errors and anchors relative paths."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{uri}: not valid YAML ({exc})") from exc
    raw = _mapping(uri, raw)
    _check_keys(uri, raw, TOP_KEYS)
    raw = _expand(raw, uri)
    base = _base_of(uri)
    name = raw.get("name") or os.path.splitext(os.path.basename(uri))[0]
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{uri}: name must be letters, digits, '_', '-', '.', got {name!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"{uri}: seed must be an integer, got {seed!r}")
    sources_raw = _mapping(f"{uri}: sources", raw.get("sources"))
    if not sources_raw:
        raise SpecError(f"{uri}: sources: name at least one source")
    sources = []
    for sname, body in sources_raw.items():
        where = f"{uri}: sources.{sname}"
        if not isinstance(sname, str) or not _NAME.match(sname):
            raise SpecError(f"{where}: a source name must be letters, digits, '_', '-', '.'")
        if isinstance(body, str):
            body = {"path": body}
        body = _mapping(where, body)
        _check_keys(where, body, SOURCE_KEYS)
        if not isinstance(body.get("path"), str) or not body["path"]:
            raise SpecError(f"{where}: path is required (a file, folder or URI)")
        for key, kind in (("format", str), ("task", str), ("filter", str)):
            if body.get(key) is not None and not isinstance(body[key], kind):
                raise SpecError(f"{where}: {key} must be a string, got {body[key]!r}")
        cap = body.get("cap")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise SpecError(f"{where}: cap must be an integer >= 0, got {cap!r}")
        weight = body.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0
        ):
            raise SpecError(f"{where}: weight must be a number >= 0, got {weight!r}")
        short = body.get("short_answer", False)
        if not isinstance(short, bool):
            raise SpecError(f"{where}: short_answer must be true or false, got {short!r}")
        sources.append(
            SourceSpec(
                name=sname,
                path=_resolve(body["path"], base),
                format=body.get("format"),
                options=_mapping(f"{where}.options", body.get("options")),
                task=body.get("task"),
                filter=body.get("filter"),
                cap=cap,
                weight=None if weight is None else float(weight),
                short_answer=short,
            )
        )
    export = raw.get("export")
    if export is not None:
        export = _mapping(f"{uri}: export", export)
        _check_keys(f"{uri}: export", export, EXPORT_KEYS)
        if not export.get("format") or not export.get("to"):
            raise SpecError(f"{uri}: export needs a format and a `to` folder")
        export = {**export, "to": str(export["to"])}
    prefix = raw.get("prefix_ids", True)
    if not isinstance(prefix, bool):
        raise SpecError(f"{uri}: prefix_ids must be true or false")
    output = raw.get("output")
    return MixtureSpec(
        uri=uri,
        name=name,
        description=str(raw.get("description") or ""),
        sources=tuple(sources),
        seed=seed,
        output=str(output) if output else None,
        prefix_ids=prefix,
        balance=_mapping(f"{uri}: balance", raw.get("balance")),
        short_answer=_mapping(f"{uri}: short_answer", raw.get("short_answer")),
        export_check=_mapping(f"{uri}: export_check", raw.get("export_check")),
        export=export,
    )


def load_spec(uri: str) -> MixtureSpec:
    try:
        data = Location.of(uri).read_bytes()
    except OSError as exc:
        raise SpecError(f"{uri}: cannot read the mixture spec ({exc})") from exc
    return parse_spec(data.decode("utf-8"), uri)


# ---- task types ------------------------------------------------------------------------------

TASK_TYPES = ("text-only", "caption", "single-turn", "multi-turn")


def infer_tasks(table: pa.Table) -> pa.Array:
    """Per row: `text-only` (turns, no image), `caption` (no turns), `single-turn` (at most one
    answer) or `multi-turn`."""
    n = table.num_rows

    def lengths(name: str) -> np.ndarray:
        if name not in table.column_names:
            return np.zeros(n, np.int64)
        return pc.fill_null(pc.list_value_length(table.column(name)), 0).to_numpy(
            zero_copy_only=False
        )

    images, turns = lengths("images"), lengths("conversations")
    answers = np.zeros(n, np.int64)
    if "conversations" in table.column_names:
        conv = table.column("conversations").combine_chunks()
        speakers = pc.struct_field(conv.flatten(), "from")
        is_answer = pc.fill_null(pc.equal(speakers, "gpt"), False).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(conv).to_numpy(zero_copy_only=False)
        answers = np.bincount(parents[is_answer], minlength=n)[:n]
    out = np.where(answers > 1, "multi-turn", "single-turn").astype(object)
    out[(turns > 0) & (images == 0)] = "text-only"
    out[turns == 0] = "caption"
    return pa.array(out.tolist(), pa.string())


__all__ = [
    "MixtureSpec",
    "SourceSpec",
    "SpecError",
    "TASK_TYPES",
    "infer_tasks",
    "load_spec",
    "parse_spec",
]
