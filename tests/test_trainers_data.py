"""Streaming training batches from warren shards: sharding over ranks and workers checked against
brute-force reads of the files, length grouping, padding worked out by hand, and the counting of
rows that cannot be trained on. Shards are written in tmp_path in the canonical schema, with
generated solid-colour images whose colour the text names.

The helpers here (tokenizer, images, rows, shards) are shared with test_trainers_train.py."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_models import word_level_tokenizer
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from warren.stages.schema import rows_to_table
from warren.trainers.data import (
    BAD_IMAGE,
    MALFORMED,
    MISSING_IMAGE,
    NO_LOSS,
    DataProblemError,
    LlavaStream,
    StreamingLoader,
    StreamOptions,
    assign_units,
    collate,
    group_by_length,
    iter_rows,
    plan_units,
)
from warren.trainers.templates import IGNORE_INDEX, VICUNA_V1_SYSTEM, ConversationEncoder

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
}
QUESTION = "<image>\nwhat color is the picture?"
CORPUS = [
    VICUNA_V1_SYSTEM,
    "USER: ASSISTANT: what color is the picture? the picture is",
    "this is a picture . " + " ".join(COLORS),
    "one two three four five six seven eight nine ten",
]
N_IMG = 4  # image tokens per image in the data-only tests (no model)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over CORPUS that puts bos in front, like Llama's; `<image>` is a
    special added token, as build_llava makes it."""
    return word_level_tokenizer(CORPUS, special=["<image>"], plain=["\n"])


def image_processor(size: int = 32) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def png(color: str, size: tuple[int, int] = (40, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, COLORS[color]).save(out, format="PNG")
    return out.getvalue()


def color_of(i: int) -> str:
    return list(COLORS)[i % len(COLORS)]


def color_row(i: int, color: str | None = None, **overrides) -> dict:
    """Row `row-NNNN`: one image of a solid colour, a caption and a one-turn conversation that
    both name it."""
    color = color or color_of(i)
    row = {
        "id": f"row-{i:04d}",
        "images": [{"bytes": png(color), "path": f"img/{i}.png"}],
        "caption": f"this is a {color} picture .",
        "conversations": [
            {"from": "human", "value": QUESTION},
            {"from": "gpt", "value": f"the picture is {color} ."},
        ],
        "source": "test",
    }
    row.update(overrides)
    return row


def write_shards(
    folder: Path, rows: list[dict], rows_per_file: int, row_group_size: int
) -> list[Path]:
    """`rows` as part-NNNNN.parquet files of `rows_per_file` rows, in row groups of
    `row_group_size`, as a pipeline stage writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, len(rows), rows_per_file)):
        path = folder / f"part-{k:05d}.parquet"
        table = rows_to_table(rows[start : start + rows_per_file])
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def stream(data, template="vicuna_v1", max_length=None, tok=None, **options) -> LlavaStream:
    tok = tok or word_tokenizer()
    encoder = ConversationEncoder(tok, template, num_image_tokens=N_IMG, max_length=max_length)
    return LlavaStream(data, encoder, image_processor(), tok.pad_token_id, StreamOptions(**options))


def batches(s: LlavaStream, worker: int = 0, num_workers: int = 1) -> list[dict]:
    return [item for item in s.iter_worker(worker, num_workers) if "inputs" in item]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """53 rows in files of 12 rows (the last has 5), in row groups of 5: 13 row groups of 2 to 5
    rows."""
    folder = tmp_path_factory.mktemp("uneven")
    write_shards(folder, [color_row(i) for i in range(53)], rows_per_file=12, row_group_size=5)
    return folder


def all_ids(folder: Path) -> list[str]:
    return [i for f in sorted(folder.glob("*.parquet")) for i in pq.read_table(f)["id"].to_pylist()]


def test_sharding_reads_every_row_exactly_once_across_ranks_and_workers(uneven_shards):
    units = plan_units(uneven_shards)
    assert len(units) == 13 and sum(u.num_rows for u in units) == 53
    world_size, num_workers = 2, 3
    for epoch in (0, 1):
        seen: list[str] = []
        rank_totals = []
        for rank in range(world_size):
            total = 0
            for worker in range(num_workers):
                mine = assign_units(
                    units,
                    seed=7,
                    epoch=epoch,
                    rank=rank,
                    world_size=world_size,
                    worker=worker,
                    num_workers=num_workers,
                )
                # What the slot reads is what a brute-force read of its row groups holds.
                expected = [
                    i
                    for u in mine
                    for i in pq.ParquetFile(u.file).read_row_group(u.row_group)["id"].to_pylist()
                ]
                got = [row["id"] for _, row in iter_rows(mine, read_rows=2)]
                assert got == expected
                s = stream(uneven_shards, seed=7, rank=rank, world_size=world_size, batch_size=3)
                s.set_epoch(epoch)
                streamed = [i for b in batches(s, worker, num_workers) for i in b["ids"]]
                assert sorted(streamed) == sorted(expected)
                seen += streamed
                total += len(expected)
            rank_totals.append(total)
        assert sorted(seen) == sorted(all_ids(uneven_shards))  # every row, once
        assert abs(rank_totals[0] - rank_totals[1]) <= 5  # within one row group


def test_the_plan_is_the_same_for_the_same_seed_and_changes_with_epoch_and_seed(uneven_shards):
    units = plan_units(uneven_shards)

    def plan(seed, epoch):
        return [
            assign_units(
                units, seed=seed, epoch=epoch, world_size=2, rank=r, num_workers=2, worker=w
            )
            for r in range(2)
            for w in range(2)
        ]

    assert plan(3, 0) == plan(3, 0)
    assert plan(3, 1) != plan(3, 0)
    assert plan(4, 0) != plan(3, 0)

    def order(seed, epoch):
        s = stream(uneven_shards, seed=seed, batch_size=4, shuffle_buffer=8)
        s.set_epoch(epoch)
        return [b["ids"] for b in batches(s)]

    first = order(3, 0)
    assert first == order(3, 0)
    assert order(3, 1) != first and order(4, 0) != first
    assert sorted(i for b in order(3, 1) for i in b) == sorted(all_ids(uneven_shards))


def test_data_loader_workers_of_two_ranks_yield_every_row_once(uneven_shards):
    seen = []
    for rank in range(2):
        loader = StreamingLoader(
            stream(uneven_shards, seed=1, rank=rank, world_size=2, batch_size=4), num_workers=2
        )
        got = list(loader)
        seen += [i for b in got for i in b.ids]
        assert {b.worker for b in got} == {0, 1}
        assert loader.epoch_stats.samples == sum(len(b.ids) for b in got)
        assert loader.positions == {
            w: 1 + max(b.index for b in got if b.worker == w) for w in (0, 1)
        }
    assert Counter(seen) == Counter(all_ids(uneven_shards))


def test_length_grouping_batches_neighbours_of_each_sorted_window():
    rng = np.random.default_rng(0)
    items = [(f"s{i}", int(n)) for i, n in enumerate(rng.integers(5, 500, 50))]
    got = list(group_by_length(items, 4, 3, np.random.default_rng(1), lambda x: x[1]))
    # Windows of 12 items; within each, the batches are the sorted window cut in fours.
    k = 0
    for start in range(0, 50, 12):
        window = sorted(items[start : start + 12], key=lambda x: x[1])
        chunks = [tuple(window[i : i + 4]) for i in range(0, len(window), 4)]
        assert sorted(tuple(b) for b in got[k : k + len(chunks)]) == sorted(chunks)
        k += len(chunks)
    assert k == len(got) and [len(b) for b in got].count(2) == 1  # 50 = 12 * 4 + 2
    spread = np.mean([max(x[1] for x in b) - min(x[1] for x in b) for b in got])
    unsorted = np.mean(
        [
            max(x[1] for x in b) - min(x[1] for x in b)
            for b in (items[i : i + 4] for i in range(0, 48, 4))
        ]
    )
    # Sorted windows of 12 leave about 3/13 of the range within a batch, random fours 3/5.
    assert spread < unsorted / 2


def test_stream_batches_hold_samples_of_close_length(tmp_path):
    # Answers of 1 to 10 extra words give lengths spread over 10 tokens.
    words = CORPUS[-1].split()
    rows = [
        color_row(
            i,
            conversations=[
                {"from": "human", "value": QUESTION},
                {"from": "gpt", "value": " ".join(words[: 1 + i % 10])},
            ],
        )
        for i in range(80)
    ]
    write_shards(tmp_path, rows, rows_per_file=80, row_group_size=80)
    got = batches(stream(tmp_path, batch_size=8, length_group_batches=10, shuffle_buffer=0))
    assert sum(len(b["ids"]) for b in got) == 80
    for b in got:
        lengths = b["inputs"]["attention_mask"].sum(1)
        assert int(lengths.max() - lengths.min()) <= 1


class _S:
    def __init__(self, input_ids, labels):
        self.input_ids, self.labels = input_ids, labels


def test_collate_pads_ids_with_the_pad_id_labels_with_ignore_and_masks_padding():
    samples = [_S([1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7]), _S([1, 8], [IGNORE_INDEX, 8])]
    pixels = torch.arange(6.0).reshape(2, 3)
    out = collate(samples, pad_token_id=3, pixel_values=pixels)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 3, 3]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["pixel_values"] is pixels
    assert "pixel_values" not in collate(samples, pad_token_id=3)


def test_pixel_values_follow_the_order_of_the_batchs_image_tokens(tmp_path):
    two = "<image>\nwhat color is the picture?"
    rows = [
        color_row(
            i,
            images=[
                {"bytes": png(color_of(i)), "path": None},
                {"bytes": png(color_of(i + 1)), "path": None},
            ],
            conversations=[
                {"from": "human", "value": two},
                {"from": "gpt", "value": "the picture is red ."},
                {"from": "human", "value": two},
                {"from": "gpt", "value": "the picture is blue ."},
            ],
        )
        if i % 2
        else color_row(i)
        for i in range(8)
    ]
    write_shards(tmp_path, rows, rows_per_file=8, row_group_size=8)
    by_id = {r["id"]: r for r in rows}
    processor = image_processor()
    (b,) = batches(stream(tmp_path, batch_size=8))
    expected = [
        Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        for row_id in b["ids"]
        for image in by_id[row_id]["images"]
    ]
    assert torch.equal(
        b["inputs"]["pixel_values"], processor(images=expected, return_tensors="pt")["pixel_values"]
    )
    assert b["num_tokens"] == int(b["inputs"]["attention_mask"].sum())
    assert b["num_loss_tokens"] == int((b["inputs"]["labels"][:, 1:] != IGNORE_INDEX).sum())


def bad_rows() -> tuple[list[dict], dict[str, str]]:
    """20 good rows, one kept with its answer cut, and one row of each kind that is skipped."""
    long_question = "<image>\n" + " ".join(CORPUS[-1].split() * 3)
    long_answer = " ".join(CORPUS[-1].split() * 2)
    rows = [color_row(i) for i in range(20)]
    rows.append(
        color_row(
            20,
            conversations=[
                {"from": "human", "value": QUESTION},
                {"from": "gpt", "value": long_answer},
            ],
        )
    )
    skipped = {
        "row-0021": NO_LOSS,
        "row-0022": MISSING_IMAGE,
        "row-0023": BAD_IMAGE,
        "row-0024": BAD_IMAGE,
        "row-0025": MALFORMED,
    }
    rows.append(
        color_row(
            21,
            conversations=[
                {"from": "human", "value": long_question},
                {"from": "gpt", "value": "the picture is red ."},
            ],
        )
    )
    rows.append(color_row(22, images=[{"bytes": None, "path": "lost.png"}]))
    rows.append(color_row(23, images=[{"bytes": b"not an image at all", "path": None}]))
    # A PNG cut short: its header opens, its pixels do not decode.
    rows.append(color_row(24, images=[{"bytes": png("red")[:80], "path": None}]))
    rows.append(
        color_row(
            25,
            conversations=[
                {"from": "human", "value": "what color is the picture?"},
                {"from": "gpt", "value": "the picture is red ."},
            ],
        )
    )
    return rows, skipped


def test_rows_that_cannot_be_trained_on_are_skipped_counted_and_named(tmp_path):
    rows, skipped = bad_rows()
    write_shards(tmp_path / "data", rows, rows_per_file=26, row_group_size=26)
    # 58 tokens fit a good row; the long answer is cut, the long question leaves no answer.
    loader = StreamingLoader(
        stream(tmp_path / "data", max_length=58, batch_size=4, max_bad_share=0.25),
        problems_path=tmp_path / "problems.jsonl",
    )
    got = [i for b in loader for i in b.ids]
    assert sorted(got) == [f"row-{i:04d}" for i in range(21)]
    stats = loader.stats
    assert (stats.rows, stats.samples, stats.skipped) == (26, 21, 5)
    assert (stats.no_loss_tokens, stats.missing_image, stats.bad_image, stats.malformed) == (
        1,
        1,
        2,
        1,
    )
    assert (stats.truncated, stats.answer_truncated) == (1, 1)
    problems = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert {p["id"]: p["kind"] for p in problems} == skipped
    by_id = {p["id"]: p for p in problems}
    assert by_id["row-0022"]["reason"] == "image 0 has no bytes (path 'lost.png')"
    assert by_id["row-0024"]["reason"].startswith("does not decode")
    assert by_id["row-0025"]["reason"].startswith("0 <image> marker(s)")
    assert by_id["row-0023"]["where"].endswith("part-00000.parquet:23")


def test_more_skipped_rows_than_max_bad_share_fail_with_the_counts(tmp_path):
    rows, _ = bad_rows()
    write_shards(tmp_path, rows, rows_per_file=26, row_group_size=26)
    # One worker reads everything: it stops at the skip that puts the data set over the limit.
    with pytest.raises(
        DataProblemError,
        match=r"one data worker: 2 of \d+ rows skipped .*"
        r"already exceed max_bad_share 5.00% of the 26 rows",
    ):
        list(StreamingLoader(stream(tmp_path, max_length=58, max_bad_share=0.05)))


def test_workers_each_under_the_limit_still_fail_the_epoch_together(tmp_path):
    rows, _ = bad_rows()
    # Two files of 13 rows, one per worker, with 2 rows each skipped while reading (under the
    # 2.6-row limit alone); a third in the second file fails to decode later: 5 of 26 in all.
    first = rows[21:23] + rows[:11]
    second = rows[23:26] + rows[11:21]
    write_shards(tmp_path, first + second, rows_per_file=13, row_group_size=13)
    s = stream(tmp_path, max_length=58, max_bad_share=0.1, batch_size=4)
    loader = StreamingLoader(s, num_workers=2)
    with pytest.raises(
        DataProblemError,
        match=r"epoch 0: 5 of 26 rows skipped \(no_loss_tokens 1, missing_image 1, bad_image 2, ",
    ):
        list(loader)


def _stage_folder(folder: Path, rows: list[dict], stray: list[dict]) -> Path:
    """A completed stage folder as the runner writes it: two listed shards in its manifest, and
    a stray `part-x.parquet` (a leftover of a killed task) that the manifest does not list."""
    paths = write_shards(folder, rows, rows_per_file=4, row_group_size=2)
    pq.write_table(rows_to_table(stray), folder / "part-x.parquet")
    files = [
        {"name": p.name, "rows": pq.read_metadata(p).num_rows, "bytes": p.stat().st_size}
        for p in paths
    ]
    manifest = {"stage": "sample", "files": files, "rejected_files": []}
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    return folder


def test_data_from_a_stage_folder_reads_only_the_shards_its_manifest_lists(tmp_path):
    rows = [color_row(i) for i in range(8)]
    folder = _stage_folder(tmp_path / "03-sample", rows, [color_row(99)])
    ids = [r["id"] for _, r in iter_rows(plan_units(folder), ["id"])]
    # the 8 listed rows, each once; row-0099 of the stray file is never read
    assert sorted(ids) == [f"row-{i:04d}" for i in range(8)]


def test_data_from_a_run_folder_trains_on_its_final_stage(tmp_path):
    out = tmp_path / "out"
    _stage_folder(out / "00-ingest", [color_row(i) for i in range(12)], [])
    _stage_folder(out / "01-sample", [color_row(i) for i in range(4)], [color_row(98)])
    summary = {
        "stages": [{"folder": "00-ingest"}, {"folder": "01-sample"}],
        "final": {"folder": "01-sample", "rows": 4},
    }
    (out / "run.json").write_text(json.dumps(summary))
    ids = [r["id"] for _, r in iter_rows(plan_units(out), ["id"])]
    assert sorted(ids) == ["row-0000", "row-0001", "row-0002", "row-0003"]


def test_a_plain_folder_of_parquet_files_is_still_read_whole(tmp_path):
    write_shards(tmp_path, [color_row(i) for i in range(6)], rows_per_file=4, row_group_size=2)
    ids = [r["id"] for _, r in iter_rows(plan_units(tmp_path), ["id"])]
    assert sorted(ids) == [f"row-{i:04d}" for i in range(6)]


def save_untrained_parts(root: Path) -> Path:
    """root/vision (a tiny CLIP tower and its image processor) and root/llm (a tiny Llama and the
    word tokenizer), untrained, drawn after seed 0: a LLaVA model assembled from parts."""
    import torch
    from tiny_models import llm_config, vision_config
    from transformers import CLIPVisionModel, LlamaForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(0)
    CLIPVisionModel(vision_config()).save_pretrained(root / "vision")
    image_processor().save_pretrained(root / "vision")
    LlamaForCausalLM(llm_config(len(tok))).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root
