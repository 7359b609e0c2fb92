"""The canonical warren row: the one definition every stage, reader, exporter and trainer uses.

A row is an Arrow record. Stages add the columns they produce and never rename others; any column
named here must have the type given here, so shards written by different stages and different
runs always concatenate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

# The Hugging Face `Image` feature layout, so `datasets` reads `images` as a list of images.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
TURN_TYPE = pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())])

# Columns every row has (possibly null / empty), in canonical order.
CORE_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("images", pa.list_(IMAGE_TYPE)),
    pa.field("caption", pa.string()),
    pa.field("conversations", pa.list_(TURN_TYPE)),
    pa.field("source", pa.string()),
    pa.field("url", pa.string()),
    pa.field("license", pa.string()),
]

# Columns that stages add. Their type is fixed so every shard agrees; embeddings are
# fixed_size_list<float16> whose width depends on the model, checked by `is_embedding_type`.
SIGNAL_FIELDS: list[pa.Field] = [
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("clip_score", pa.float32()),
    pa.field("cluster_id", pa.int64()),
    pa.field("cos_to_centroid", pa.float32()),
    pa.field("ppl", pa.float32()),
    pa.field("ppl_tokens", pa.int32()),
    pa.field("ppl_model", pa.string()),
    pa.field("ppl_norm", pa.float32()),
    pa.field("emb_model", pa.string()),
    # the sscd stage's copy-detection model (its descriptors are `sscd_emb`)
    pa.field("sscd_model", pa.string()),
    pa.field("gen_model", pa.string()),
    pa.field("gen_prompt", pa.string()),
    pa.field("gen_params", pa.string()),
    # recaption keeps the caption it replaced; capfusion the synthetic caption it fused.
    pa.field("original_caption", pa.string()),
    pa.field("synthetic_caption", pa.string()),
    pa.field("fusion_model", pa.string()),
    pa.field("fusion_prompt", pa.string()),
    pa.field("fusion_params", pa.string()),
    # a mixture's task type per row (stages.mixture_spec.infer_tasks, or the spec's `task`)
    pa.field("task", pa.string()),
    # the everyday filters' scores (image_filter, caption_filter, language, nsfw)
    pa.field("aspect_ratio", pa.float32()),
    pa.field("image_bytes", pa.int64()),
    pa.field("n_frames", pa.int32()),
    pa.field("blank_share", pa.float32()),
    pa.field("caption_words", pa.int32()),
    pa.field("caption_chars", pa.int32()),
    pa.field("char_rep_ratio", pa.float32()),
    pa.field("word_rep_ratio", pa.float32()),
    pa.field("boilerplate_pattern", pa.string()),
    pa.field("lang", pa.string()),
    pa.field("lang_score", pa.float32()),
    pa.field("nsfw_score", pa.float32()),
    # ngram_resample's keep probability (Llama 3's caption n-gram resampling)
    pa.field("ngram_keep_p", pa.float32()),
    # LAION's aesthetic score (aesthetic) and watermark probability (watermark)
    pa.field("aesthetic_score", pa.float32()),
    pa.field("watermark_prob", pa.float32()),
    # exact_dedup's content hashes and phash_dedup's perceptual hash and group
    pa.field("image_sha256", pa.string()),
    pa.field("pixel_hash", pa.string()),
    pa.field("caption_hash", pa.string()),
    pa.field("phash", pa.int64()),
    pa.field("phash_group_size", pa.int64()),
    pa.field("phash_distance", pa.int32()),
    # every automatic edit a reader made to a row, one line each ("role 'user' -> 'human' (turn
    # 1)", "inserted <image> in turn 1"); null when none (stages.conversation)
    pa.field("edits", pa.list_(pa.string())),
    # provenance of a removal, as data (the report and `warren explain` read these, never the
    # reason text): the id of the kept row a rejected duplicate was removed in favour of, and how
    # alike the two are (cosine for embedding dedup, 1.0 for exact copies, 1 - bits/64 for pHash)
    pa.field("duplicate_of", pa.string()),
    pa.field("similarity", pa.float32()),
    # columns the dedup, clustering and mixture stages write (semdedup's statistic per
    # rule, image_based's cluster and mark, short_answer's count of edited questions)
    pa.field("max_cos_earlier", pa.float32()),
    pa.field("component_size", pa.int64()),
    pa.field("image_cluster", pa.int64()),
    pa.field("near_reference", pa.bool_()),
    pa.field("short_answer_turns", pa.int32()),
    # what the generation stages write beside their provenance columns. The model's text
    # of a rejected reply (`gen_raw`, `fusion_raw`), the usage behind each row (tokens, whether
    # paid now or served from the cache; responses served from the cache), and the caption that
    # allava_generate replaced.
    pa.field("gen_raw", pa.string()),
    pa.field("gen_prompt_tokens", pa.int64()),
    pa.field("gen_completion_tokens", pa.int64()),
    pa.field("gen_cache_hits", pa.int32()),
    pa.field("source_caption", pa.string()),
    pa.field("fusion_raw", pa.string()),
    pa.field("fusion_prompt_tokens", pa.int64()),
    pa.field("fusion_completion_tokens", pa.int64()),
    pa.field("fusion_cache_hits", pa.int32()),
]
EMBEDDING_COLUMNS = ("image_emb", "text_emb", "sscd_emb")

CORE_SCHEMA = pa.schema(CORE_FIELDS)
KNOWN_TYPES: dict[str, pa.DataType] = {f.name: f.type for f in CORE_FIELDS + SIGNAL_FIELDS}

# The column a stage sets to a non-null string to reject a row; the runner turns it into the
# `reason` column of the rejected ledger and drops it from kept rows.
REJECT_COLUMN = "_reject"
EDITS_COLUMN = "edits"
REASON_COLUMN = "reason"

IMAGE_MARKER = "<image>"
# Ray Data's read_parquet(include_paths=True) writes the source file into a column of this name,
# overwriting any column already called so; the runner needs it to resume shard by shard.
RESERVED_COLUMNS = ("path",)


class SchemaError(ValueError):
    """A table does not match the canonical schema; the message names the column and the types."""


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)


#: The declared type of an embedding column, whose width depends on the model.
EMBEDDING_DECLARED = "fixed_size_list<halffloat>[model width]"


#: A window stage writes each row's rank by the column it ranks as `<column>_rank` (int64, 0 =
#: the first row in the stage's order), kept and rejected rows alike.
RANK_SUFFIX = "_rank"
RANK_TYPE = pa.int64()


def rank_column(column: str) -> str:
    """The column a window stage writes the ranks of `column` to."""
    return column + RANK_SUFFIX


def column_type(name: str) -> pa.DataType | str:
    """The type a stage declares for a column it adds: from KNOWN_TYPES, or EMBEDDING_DECLARED
    for an embedding. A name the schema does not know is an error, so every added column is
    written down here once."""
    if name in EMBEDDING_COLUMNS:
        return EMBEDDING_DECLARED
    if name.endswith(RANK_SUFFIX) and name[: -len(RANK_SUFFIX)] in KNOWN_TYPES:
        return RANK_TYPE
    if name not in KNOWN_TYPES:
        raise KeyError(f"column {name!r} is not in warren.stages.schema (SIGNAL_FIELDS)")
    return KNOWN_TYPES[name]


def is_embedding_type(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_float16(t.value_type)


def _describe(where: str | None) -> str:
    return f"{where}: " if where else ""


def validate(table: pa.Table | pa.Schema, where: str | None = None) -> None:
    """Raise SchemaError naming the first column whose type is not the canonical one.

    `where` (a file name, a stage name) is put in front of the message so the user knows which
    input is wrong.
    """
    schema = table if isinstance(table, pa.Schema) else table.schema
    for name in RESERVED_COLUMNS:
        if name in schema.names:
            raise SchemaError(
                f"{_describe(where)}column '{name}' is reserved by the runner; "
                "rename it (e.g. with the reader's `columns` option)"
            )
    if "id" not in schema.names:
        raise SchemaError(f"{_describe(where)}missing required column 'id' (expected string)")
    for field in schema:
        name = field.name
        if name in EMBEDDING_COLUMNS:
            if not is_embedding_type(field.type):
                raise SchemaError(
                    f"{_describe(where)}column '{name}' has type {field.type}, "
                    "expected fixed_size_list<float16>[dim]"
                )
            continue
        expected = KNOWN_TYPES.get(name)
        if expected is not None and not field.type.equals(expected):
            raise SchemaError(
                f"{_describe(where)}column '{name}' has type {field.type}, expected {expected}"
            )
    if isinstance(table, pa.Table) and table.column("id").null_count:
        raise SchemaError(
            f"{_describe(where)}column 'id' has {table.column('id').null_count} nulls"
        )


def conform(table: pa.Table, where: str | None = None) -> pa.Table:
    """Return `table` with every core column present and every known column in its canonical type.

    Missing core columns are added as nulls (an empty list for `images`). Columns whose type
    differs are cast when the cast is lossless in meaning (e.g. large_string -> string,
    null -> anything); anything else raises SchemaError naming the column.
    """
    n = table.num_rows
    columns = {}
    for field in CORE_FIELDS:
        if field.name in table.column_names:
            continue
        if field.name == "id":
            raise SchemaError(f"{_describe(where)}missing required column 'id' (expected string)")
        columns[field.name] = pa.nulls(n, field.type)
    for name, arr in columns.items():
        table = table.append_column(pa.field(name, arr.type), arr)
    for i, field in enumerate(table.schema):
        expected = KNOWN_TYPES.get(field.name)
        if expected is None or field.type.equals(expected):
            continue
        try:
            table = table.set_column(
                i, pa.field(field.name, expected), table.column(i).cast(expected)
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(
                f"{_describe(where)}column '{field.name}' has type {field.type}, expected {expected} "
                f"({exc})"
            ) from exc
    validate(table, where)
    return order_columns(table)


def order_columns(table: pa.Table) -> pa.Table:
    """Core columns first in canonical order, then the rest as they came."""
    core = [f.name for f in CORE_FIELDS if f.name in table.column_names]
    rest = [c for c in table.column_names if c not in core]
    return table.select(core + rest)


def content_id(*parts: bytes | str | None) -> str:
    """A stable id derived from content, for sources that have none."""
    h = hashlib.sha1()
    for p in parts:
        if p is None:
            p = b"\x00"
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x1f")
    return h.hexdigest()[:24]


def image_value(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def rows_to_table(rows: Iterable[dict]) -> pa.Table:
    """Build a conformed table from Python dicts (readers and tests; not for hot paths)."""
    rows = list(rows)
    names: list[str] = [f.name for f in CORE_FIELDS]
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    fields = []
    for name in names:
        if name in KNOWN_TYPES:
            fields.append(pa.field(name, KNOWN_TYPES[name]))
        elif name == REJECT_COLUMN:
            fields.append(pa.field(name, pa.string()))
    typed = {f.name for f in fields}
    data = {name: [r.get(name) for r in rows] for name in names}
    arrays = []
    out_fields = []
    for name in names:
        if name in typed:
            t = KNOWN_TYPES.get(name, pa.string())
            arrays.append(pa.array(data[name], type=t))
            out_fields.append(pa.field(name, t))
        else:
            arr = pa.array(data[name])
            arrays.append(arr)
            out_fields.append(pa.field(name, arr.type))
    return conform(pa.Table.from_arrays(arrays, schema=pa.schema(out_fields)))


def count_image_markers(conversations: list[dict] | None) -> int:
    if not conversations:
        return 0
    return sum((turn.get("value") or "").count(IMAGE_MARKER) for turn in conversations)
