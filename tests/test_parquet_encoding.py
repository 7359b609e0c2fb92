"""How warren writes Parquet (`stages.shards.write_table_atomic`): embeddings without dictionary
encoding, every other column with it, and every value read back as written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warren.stages.schema import IMAGE_TYPE, conform
from warren.stages.shards import Location, write_table_atomic


def _encodings(path) -> dict[str, tuple[str, ...]]:
    md = pq.ParquetFile(path).metadata.row_group(0)
    return {md.column(i).path_in_schema: md.column(i).encodings for i in range(md.num_columns)}


def test_embeddings_are_written_plain_and_the_rest_dictionary_encoded(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 3000, 64
    emb = rng.normal(size=(n, d)).astype(np.float16)
    blobs = [rng.bytes(300) for _ in range(3)]
    table = conform(
        pa.table(
            {
                "id": [f"r{i}" for i in range(n)],
                "images": pa.array(
                    [[{"bytes": blobs[i % 3], "path": f"{i % 3}.jpg"}] for i in range(n)],
                    pa.list_(IMAGE_TYPE),
                ),
                "caption": [["a cat", "a dog"][i % 2] for i in range(n)],
                "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), d),
            }
        )
    )
    table = table.append_column(
        "tags", pa.array([{"k": i % 2} for i in range(n)], pa.map_(pa.string(), pa.int64()))
    )
    loc = Location.of(str(tmp_path / "t.parquet"))
    write_table_atomic(table, loc)

    enc = _encodings(tmp_path / "t.parquet")
    assert "RLE_DICTIONARY" not in enc["image_emb.list.element"]
    for column in (
        "caption",
        "images.list.element.bytes",
        "images.list.element.path",
        "tags.key_value.key",
    ):
        assert "RLE_DICTIONARY" in enc[column], column
    back = pq.read_table(tmp_path / "t.parquet")
    assert back.equals(table)
    assert np.asarray(back.column("image_emb").combine_chunks().values).tobytes() == emb.tobytes()
