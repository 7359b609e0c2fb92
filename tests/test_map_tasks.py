"""How a batch stage without a model groups its pieces into Ray tasks: enough tasks to keep every
CPU busy to the end, few enough that Ray's per-task cost does not rival the work."""

from __future__ import annotations

from warren.pipelines.run_map import map_pieces, pieces_per_task


def _pieces(shards: int, rows: int) -> list[dict]:
    sources = {f"s{i}": f"/in/s{i}.parquet" for i in range(shards)}
    return map_pieces(sources, dict.fromkeys(sources, rows), 4096)


def test_many_small_pieces_share_a_task_while_every_cpu_keeps_four_tasks():
    # 100 pieces of 512 rows on 2 CPUs: 8 tasks wanted (4 per CPU) -> 100 // 8 = 12 per task
    assert pieces_per_task(_pieces(100, 512), 2) == 12


def test_a_task_holds_at_most_32k_rows():
    # 1000 pieces of 2048 rows: 32768 // 2048 = 16 per task, though 1000 // 8 would allow 125
    assert pieces_per_task(_pieces(1000, 2048), 2) == 16


def test_few_pieces_get_a_task_each():
    assert pieces_per_task(_pieces(10, 512), 2) == 1
    assert pieces_per_task([], 2) == 1
