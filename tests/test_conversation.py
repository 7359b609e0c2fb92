"""One definition of a valid conversation: the readers apply it at ingest, export_check at export.

Expected roles, edits and reasons are worked out by hand from the items written here; the
property test checks the agreement itself: whatever odd conversation ingest keeps, export_check
keeps too, and every change ingest made is on the row's `edits`.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from warren.stages.export_check import ExportCheck
from warren.stages.readers import LlavaJsonReader, ParquetReader
from warren.stages.schema import EDITS_COLUMN, REJECT_COLUMN


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def read_all(reader) -> pa.Table:
    units = reader.plan()
    reader = pickle.loads(pickle.dumps(reader))
    return pa.concat_tables([t for u in units for t in reader.read(u)])


def by_id(table: pa.Table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


# Each item: (conversations, images, expected turns after ingest or None, expected edits,
# expected reason). Worked out by hand from the rules in stages/conversation.py.
CASES = {
    "trailing-space": (
        turns(("human ", "<image>\nq"), ("gpt", "a")),
        1,
        turns(("human", "<image>\nq"), ("gpt", "a")),
        ["role 'human ' -> 'human' (turn 1)"],
        None,
    ),
    "user-assistant": (
        turns(("user", "q"), ("assistant", "a")),
        0,
        turns(("human", "q"), ("gpt", "a")),
        ["role 'user' -> 'human' (turn 1)", "role 'assistant' -> 'gpt' (turn 2)"],
        None,
    ),
    "upper-model": (
        turns((" USER", "q"), ("model", "a")),
        0,
        turns(("human", "q"), ("gpt", "a")),
        ["role ' USER' -> 'human' (turn 1)", "role 'model' -> 'gpt' (turn 2)"],
        None,
    ),
    "marker-inserted": (
        turns(("system", "be brief"), ("human", "q"), ("gpt", "a")),
        2,
        turns(("system", "be brief"), ("human", "<image>\n<image>\nq"), ("gpt", "a")),
        ["inserted 2 x <image> in turn 2"],
        None,
    ),
    "starts-with-model": (
        turns(("gpt", "hello"), ("human", "q"), ("gpt", "a")),
        0,
        None,
        [],
        "llava_json: starts with the model's turn (turn 1 is 'gpt')",
    ),
    "system-then-assistant": (
        turns(("system", "s"), ("assistant", "hello"), ("user", "q")),
        0,
        None,
        ["role 'assistant' -> 'gpt' (turn 2)", "role 'user' -> 'human' (turn 3)"],
        "llava_json: starts with the model's turn (turn 2 is 'gpt')",
    ),
    "bot": (
        turns(("human", "q"), ("bot", "a")),
        0,
        None,
        [],
        "llava_json: unknown role (turn 2 is 'bot')",
    ),
    "blank": (
        turns(("human", "q"), ("gpt", "  ")),
        0,
        None,
        [],
        "llava_json: empty turn (turn 2, 'gpt')",
    ),
    "two-humans": (
        turns(("human", "q"), ("user", "q2"), ("gpt", "a")),
        0,
        None,
        ["role 'user' -> 'human' (turn 2)"],
        "llava_json: turns do not alternate (turn 2 is 'human', expected 'gpt')",
    ),
    "ends-human": (
        turns(("human", "q"), ("gpt", "a"), ("human", "q2")),
        0,
        None,
        [],
        "llava_json: turns do not alternate (ends with 'human', expected 'gpt')",
    ),
    "too-many-markers": (
        turns(("human", "<image>\n<image>\nq"), ("gpt", "a")),
        1,
        None,
        [],
        "llava_json: image marker mismatch (2 markers, 1 images)",
    ),
}


@pytest.fixture()
def llava_file(tmp_path: Path) -> Path:
    (tmp_path / "a.png").write_bytes(png((10, 20, 30)))
    (tmp_path / "b.png").write_bytes(png((200, 20, 30)))
    items = [
        {"id": key, "image": ["a.png", "b.png"][:n], "conversations": conv}
        for key, (conv, n, *_) in CASES.items()
    ]
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(items))
    return path


def test_ingest_normalises_roles_records_every_edit_and_rejects_invalid_conversations(llava_file):
    rows = by_id(read_all(LlavaJsonReader(str(llava_file))))
    assert set(rows) == set(CASES)
    for key, (_, _, expected_turns, expected_edits, reason) in CASES.items():
        row = rows[key]
        assert row[REJECT_COLUMN] == reason, key
        assert (row[EDITS_COLUMN] or []) == expected_edits, key
        if expected_turns is not None:
            assert row["conversations"] == expected_turns, key


def test_export_check_gives_the_same_verdict_as_ingest_on_normalised_rows(llava_file):
    table = read_all(LlavaJsonReader(str(llava_file)))
    reasons = table.column(REJECT_COLUMN).to_pylist()
    checked = ExportCheck().process(table.drop_columns([REJECT_COLUMN]))
    after = checked.column(REJECT_COLUMN).to_pylist()
    for before, now in zip(reasons, after, strict=True):
        if before is None:
            assert now is None
        else:
            assert now == "export_check" + before.removeprefix("llava_json")


def test_role_content_messages_in_parquet_follow_the_same_rules(tmp_path: Path):
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table(
        {
            "id": ["ok", "gemini", "model-first"],
            "messages": pa.array(
                [
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}],
                    [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}],
                ],
                messages,
            ),
            "caption": [None, None, None],
        }
    )
    pq.write_table(table, tmp_path / "chat.parquet")
    rows = by_id(read_all(ParquetReader(str(tmp_path / "chat.parquet"))))
    # user/assistant is the role/content format's own spelling: translated, not an edit
    assert rows["ok"][EDITS_COLUMN] is None and rows["ok"][REJECT_COLUMN] is None
    assert rows["gemini"][EDITS_COLUMN] == ["role 'model' -> 'gpt' (turn 2)"]
    assert rows["gemini"]["conversations"] == turns(("human", "q"), ("gpt", "a"))
    assert rows["model-first"][REJECT_COLUMN] == (
        "parquet: starts with the model's turn (turn 1 is 'gpt')"
    )


HUMAN_SPELLINGS = ["human", "user", "USER", " human ", "Human"]
GPT_SPELLINGS = ["gpt", "assistant", "model", "Gpt\t", "chatgpt"]
ODD_SPELLINGS = ["system", "bot", "", "observation", "human", "gpt"]
VALUE_PIECES = ["q", " ", "\n", "<image>", "<image>\n", "é", "<img>", "a"]


def random_conversation(rng: random.Random) -> list[dict]:
    """Mostly well-formed (a system turn or not, then alternating aliases), with one odd turn,
    a blank value or a stray marker now and then."""
    roles = ["system"] if rng.random() < 0.2 else []
    for _ in range(rng.randint(1, 3)):
        roles += [rng.choice(HUMAN_SPELLINGS), rng.choice(GPT_SPELLINGS)]
    if rng.random() < 0.3:
        roles[rng.randrange(len(roles))] = rng.choice(ODD_SPELLINGS)
    if rng.random() < 0.1:
        roles = roles[1:] or roles
    out = []
    for role in roles:
        value = rng.choice(["q", "a longer answer", "é"])
        if rng.random() < 0.15:
            value = "".join(rng.choice(VALUE_PIECES) for _ in range(rng.randint(0, 3)))
        out.append({"from": role, "value": value})
    return out


def test_whatever_odd_conversation_ingest_keeps_passes_export_check(tmp_path: Path):
    rng = random.Random(18)
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "b.png").write_bytes(png((4, 5, 6)))
    items = []
    for i in range(600):
        item = {"id": f"r{i}", "conversations": random_conversation(rng)}
        n = rng.choice([0, 0, 1, 2])
        if n:
            item["image"] = ["a.png", "b.png"][:n]
        items.append(item)
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(x) for x in items) + "\n")
    table = read_all(LlavaJsonReader(str(tmp_path / "gen.jsonl"), batch_size=64))
    assert table.num_rows == len(items)
    kept = table.filter(pa.compute.is_null(table.column(REJECT_COLUMN)))
    # enough of each kind that the property means something
    assert 30 < kept.num_rows < len(items) - 30
    checked = ExportCheck().process(kept.drop_columns([REJECT_COLUMN]))
    if REJECT_COLUMN in checked.column_names:
        assert checked.column(REJECT_COLUMN).null_count == checked.num_rows, [
            r for r in checked.column(REJECT_COLUMN).to_pylist() if r
        ]
    # Every difference between an item and its kept row is recorded on the row.
    source = {x["id"]: x for x in items}
    for row in kept.to_pylist():
        original = source[row["id"]]["conversations"]
        edits = row[EDITS_COLUMN] or []
        pairs = list(zip(original, row["conversations"], strict=True))
        renamed = sum(a["from"] != b["from"] for a, b in pairs)
        inserted = sum(a["value"] != b["value"] for a, b in pairs)
        assert len(edits) == renamed + inserted, (original, row["conversations"], edits)
        assert sum(e.startswith("role ") for e in edits) == renamed
