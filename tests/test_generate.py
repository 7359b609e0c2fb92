"""Instruction generation: reply parsing, the prompt-type draw, both stages against a scripted
chat server on 127.0.0.1, and the llava_instruct recipe end to end through the runner."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import outputs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_chat_server import FakeChatServer, Reply, ScriptedChatServer, text_of
from PIL import Image

from warren.pipelines import allava, llava_instruct
from warren.pipelines.recipe import main as recipe_main
from warren.prompts import load_prompt
from warren.stages.generate import (
    DETAIL_QUESTIONS,
    AllavaGenerate,
    BadReply,
    LlavaGenerate,
    detail_question,
    draw_type,
    parse_llava_reply,
    parse_mix,
)
from warren.stages.llm_client import estimate_prompt_tokens
from warren.stages.schema import REJECT_COLUMN, rows_to_table

SECRET = "sk-warren-gen-test-93b1c0de5a7f"
KEY_ENV = "WARREN_TEST_GEN_KEY"
# Set at import, i.e. at collection, before any test starts Ray: Ray's workers inherit the
# environment of the process that started Ray, and read the key there.
os.environ[KEY_ENV] = SECRET

QA = [{"question": "What is the dog doing?", "answer": "It runs on the grass."}]


def llava_reply(messages: list[dict[str, Any]]) -> Reply:
    """JSON for the JSON prompts, prose for `detail`; a tag in the captions picks a fault."""
    last = text_of(messages[-1]["content"])
    if "[badjson]" in last:
        return 200, "Sure! Here are the questions: 1. What is it?", "stop"
    if "[refuse]" in last:
        return 200, "I'm sorry, I can't help with that.", "stop"
    if "[trunc]" in last:
        return 200, '[{"question": "What is', "length"
    if "[deny]" in last:
        return 401, f"bad key {SECRET}", "stop"
    if "describe photographs" in messages[0]["content"]:
        return 200, "A brown dog runs across a green lawn.", "stop"
    return 200, json.dumps(QA), "stop"


def allava_reply(messages: list[dict[str, Any]]) -> Reply:
    system = messages[0]["content"]
    if "expert at describing images" in system:
        return 200, "A red square on a white background.", "stop"
    if "write challenging questions" in system:
        return 200, "What colour is the square?", "stop"
    return 200, "The square is red.", "stop"


def _params(server: FakeChatServer, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return dict(
        base_url=server.url,
        api_key_env=KEY_ENV,
        cache_dir=str(tmp_path / "llm-cache"),
        timeout_s=5.0,
        max_attempts=1,
        model="test-model",
        **extra,
    )


def _box(category: str, x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    return {"category": category, "x0": x0, "y0": y0, "x1": x1, "y1": y1}


# --- parsing ------------------------------------------------------------------------------------


def test_json_list_becomes_alternating_turns_with_one_image_marker_in_the_first_question() -> None:
    raw = json.dumps(
        [
            {"question": "What is on the table?", "answer": "A cake with candles."},
            {"question": " How many candles? ", "answer": "Five."},
        ]
    )
    turns = parse_llava_reply("conversation", raw, "stop", "id-1")
    assert turns == [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "A cake with candles."},
        {"from": "human", "value": "How many candles?"},
        {"from": "gpt", "value": "Five."},
    ]
    assert sum(t["value"].count("<image>") for t in turns) == 1


def test_json_in_a_code_fence_is_read_like_bare_json() -> None:
    raw = "```json\n" + json.dumps(QA) + "\n```"
    turns = parse_llava_reply("complex_reasoning", raw, "stop", "x")
    assert turns[0]["value"] == "<image>\nWhat is the dog doing?"


def test_detail_text_is_answered_to_a_question_picked_from_the_id() -> None:
    turns = parse_llava_reply("detail", "  A dog on grass.\n", "stop", "row-7", seed=3)
    assert turns == [
        {"from": "human", "value": "<image>\n" + detail_question("row-7", seed=3)},
        {"from": "gpt", "value": "A dog on grass."},
    ]
    assert detail_question("row-7", seed=3) in DETAIL_QUESTIONS
    picked = {detail_question(f"r{i}") for i in range(200)}
    assert picked == set(DETAIL_QUESTIONS)


@pytest.mark.parametrize(
    ("raw", "finish", "reason"),
    [
        (
            "Here you go: 1. What?",
            "stop",
            "malformed answer (not JSON: Expecting value: line 1 column 1 (char 0))",
        ),
        ('{"question": "q", "answer": "a"}', "stop", "malformed answer (not a JSON list but dict)"),
        ("[]", "stop", "malformed answer (empty list)"),
        ('["q", "a"]', "stop", "malformed answer (item 0 is not an object)"),
        ('[{"question": "q"}]', "stop", "malformed answer (item 0 has no 'answer' string)"),
        (
            '[{"question": "", "answer": "a"}]',
            "stop",
            "malformed answer (item 0 has no 'question' string)",
        ),
        (
            '[{"question": "<image> what?", "answer": "a"}]',
            "stop",
            "malformed answer (contains the <image> marker)",
        ),
        (
            "I'm sorry, I can't help with that.",
            "stop",
            "refused (I'm sorry, I can't help with that.)",
        ),
        ("As an AI, I cannot see images.", "stop", "refused (As an AI, I cannot see images.)"),
        ('[{"question": "What is', "length", "truncated (finish_reason length; raise max_tokens)"),
        ("  \n", "stop", "empty answer (finish_reason stop)"),
        (None, None, "empty answer (finish_reason None)"),
    ],
)
def test_bad_replies_name_what_is_wrong(raw: str | None, finish: str | None, reason: str) -> None:
    with pytest.raises(BadReply) as caught:
        parse_llava_reply("conversation", raw, finish, "id")
    assert str(caught.value) == reason


def test_a_description_that_quotes_an_apology_later_is_not_a_refusal() -> None:
    text = 'A shop sign reads "I\'m sorry, we are closed".'
    assert parse_llava_reply("detail", text, "stop", "id")[1]["value"] == text


# --- the draw -----------------------------------------------------------------------------------


def test_type_draw_is_deterministic_per_id_and_follows_the_mix() -> None:
    mix = parse_mix("conversation=0.5,detail=0.25,complex_reasoning=0.25")
    ids = [f"coco-{i:06d}" for i in range(1000)]
    first = [draw_type(i, mix) for i in ids]
    assert first == [draw_type(i, mix) for i in ids]
    counts = Counter(first)
    assert abs(counts["conversation"] - 500) < 60
    assert abs(counts["detail"] - 250) < 50 and abs(counts["complex_reasoning"] - 250) < 50
    assert [draw_type(i, mix, seed=1) for i in ids] != first  # the seed changes the draw
    assert {draw_type(i, parse_mix("detail=2")) for i in ids} == {"detail"}


@pytest.mark.parametrize("bad", ["chat=1", "detail", "detail=-1", "detail=0", "detail=x"])
def test_a_bad_mix_is_refused_before_any_run(bad: str) -> None:
    with pytest.raises(ValueError, match="mix"):
        LlavaGenerate(mix=bad)


# --- the stages against the scripted server -----------------------------------------------------


def _llava_rows(tags: list[str]) -> pa.Table:
    rows = []
    for i, tag in enumerate(tags):
        rows.append(
            {
                "id": f"r{i}",
                "caption": f"A dog on a lawn {tag}",
                "captions": [f"A dog on a lawn {tag}", "A brown dog running."],
                "boxes": [_box("dog", 0.1, 0.2, 0.5, 0.9)],
            }
        )
    return rows_to_table(rows)


def test_llava_stage_keeps_parsed_rows_and_rejects_the_rest_with_raw_text(tmp_path: Path) -> None:
    tags = ["[ok]", "[badjson]", "[refuse]", "[trunc]", "[deny]"]
    with ScriptedChatServer(llava_reply) as server:
        stage = LlavaGenerate(**_params(server, tmp_path, mix="conversation=1"))
        out = stage.process(_llava_rows(tags))
    rows = out.to_pylist()
    assert rows[0][REJECT_COLUMN] is None
    assert rows[0]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat is the dog doing?"},
        {"from": "gpt", "value": "It runs on the grass."},
    ]
    prompt = load_prompt("conversation")
    assert rows[0]["gen_prompt"] == f"conversation@v1#{prompt.sha256[:12]}"
    assert rows[0]["gen_model"] == "test-model"
    assert json.loads(rows[0]["gen_params"]) == {"max_tokens": 1024, "temperature": 0.7}
    assert (rows[0]["gen_prompt_tokens"], rows[0]["gen_completion_tokens"]) == (7, 3)
    assert rows[0]["gen_raw"] is None
    reasons = [r[REJECT_COLUMN] for r in rows[1:]]
    assert reasons[:3] == [
        "llava_generate: malformed answer (not JSON: Expecting value: line 1 column 1 (char 0))",
        "llava_generate: refused (I'm sorry, I can't help with that.)",
        "llava_generate: truncated (finish_reason length; raise max_tokens)",
    ]
    assert reasons[3].startswith("llava_generate: request failed (HTTP 401")
    assert SECRET not in reasons[3] and "[REDACTED]" in reasons[3]
    assert [r["gen_raw"] for r in rows[1:]] == [
        "Sure! Here are the questions: 1. What is it?",
        "I'm sorry, I can't help with that.",
        '[{"question": "What is',
        None,
    ]
    assert all(auth == f"Bearer {SECRET}" for auth in server.auth)


def test_rows_past_the_budget_are_rejected_not_done_and_a_bigger_budget_pays_only_for_them(
    tmp_path: Path,
) -> None:
    table = _llava_rows(["[ok]"] * 4)
    # Distinct captions, so the four requests differ.
    table = table.set_column(
        table.column_names.index("captions"),
        "captions",
        pa.array([[f"Dog number {i}."] for i in range(4)], type=pa.list_(pa.string())),
    )
    with ScriptedChatServer(llava_reply) as server:
        stage = LlavaGenerate(**_params(server, tmp_path, mix="conversation=1", max_tokens=50))
        messages = stage.prompts()["conversation"].render(
            {"captions": ["Dog number 0."], "boxes": []}
        )
        # A request is sent only if its worst case (prompt estimate + max_tokens) fits: one does,
        # and once it has used its 10 tokens a second no longer does.
        worst = estimate_prompt_tokens(messages) + 50
        small = LlavaGenerate(stage.params, max_total_tokens=worst + 5)
        first = small.process(table).column(REJECT_COLUMN).to_pylist()
        assert len(server.log) == 1
        # The stage's budget spans batches: the next batch of the same run sends nothing.
        assert small.process(table).column(REJECT_COLUMN).to_pylist().count(None) == 1
        assert len(server.log) == 1
        big = LlavaGenerate(stage.params, max_total_tokens=100_000)
        second = big.process(table).column(REJECT_COLUMN).to_pylist()
    assert first.count("llava_generate: not done (budget)") == 3 and first.count(None) == 1
    assert second == [None] * 4
    assert len(server.log) == 4  # the row answered under the small budget came from the cache


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_allava_stage_captions_asks_and_answers_in_three_rounds(tmp_path: Path) -> None:
    table = rows_to_table(
        [
            {"id": "a", "caption": "red", "images": [{"bytes": _png((255, 0, 0)), "path": None}]},
            {"id": "b", "caption": "none", "images": []},
            {"id": "c", "caption": "junk", "images": [{"bytes": b"not an image", "path": None}]},
        ]
    )
    with ScriptedChatServer(allava_reply) as server:
        out = AllavaGenerate(**_params(server, tmp_path)).process(table).to_pylist()
    a, b, c = out
    assert a[REJECT_COLUMN] is None
    assert a["caption"] == "A red square on a white background."
    assert a["source_caption"] == "red"
    assert a["conversations"] == [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "The square is red."},
    ]
    assert a["gen_prompt"].count("@v1#") == 3 and a["gen_prompt_tokens"] == 21
    assert b[REJECT_COLUMN] == "allava_generate: no image"
    assert c[REJECT_COLUMN].startswith("allava_generate: unreadable image (")
    assert len(server.log) == 3
    # The image went to the model as a data URL in every round.
    assert all('"image_url"' in entry["content"] for entry in server.log)


def test_allava_rejects_a_refused_question_with_the_round_named(tmp_path: Path) -> None:
    def reply(messages: list[dict[str, Any]]) -> Reply:
        if "write challenging questions" in messages[0]["content"]:
            return 200, "I'm sorry, I cannot do that.", "stop"
        return allava_reply(messages)

    table = rows_to_table(
        [{"id": "a", "caption": "x", "images": [{"bytes": _png((0, 0, 255)), "path": None}]}]
    )
    with ScriptedChatServer(reply) as server:
        (row,) = AllavaGenerate(**_params(server, tmp_path)).process(table).to_pylist()
    assert row[REJECT_COLUMN] == (
        "allava_generate: refused (question; I'm sorry, I cannot do that.)"
    )
    assert row["gen_raw"] == "I'm sorry, I cannot do that."
    assert len(server.log) == 2  # no answer is asked for a refused question


# --- the recipe through the runner --------------------------------------------------------------


def test_llava_recipe_end_to_end_caches_rejects_and_leaks_no_key(
    ray_session, tmp_path: Path
) -> None:
    tags = ["[ok]", "[ok] park", "[ok] beach", "[ok] snow", "[badjson]", "[refuse]"]
    mix = parse_mix("conversation=0.5,detail=0.5")
    # Both types are exercised, and the bad JSON goes to a JSON prompt (prose is fine for detail).
    assert [draw_type(f"r{i}", mix) for i in (2, 3, 4, 5)] == [
        "detail",
        "conversation",
        "conversation",
        "detail",
    ]
    source = tmp_path / "input.parquet"
    pq.write_table(_llava_rows(tags), source)
    out = tmp_path / "out"
    with ScriptedChatServer(llava_reply) as server:
        argv = [
            "--input",
            str(source),
            "--output",
            str(out),
            "--quiet",
            "--llava_generate.base_url",
            server.url,
            "--llava_generate.api_key_env",
            KEY_ENV,
            "--llava_generate.cache_dir",
            str(tmp_path / "llm-cache"),
            "--llava_generate.mix",
            "conversation=0.5,detail=0.5",
            "--llava_generate.max_attempts",
            "1",
        ]
        assert recipe_main(llava_instruct.pipeline(), argv) == 0
        sent = len(server.log)
        assert recipe_main(llava_instruct.pipeline(), [*argv, "--force"]) == 0
        assert len(server.log) == sent == len(tags)  # the forced re-run was served by the cache
    assert all(auth == f"Bearer {SECRET}" for auth in server.auth)

    stage_dir = out / "01-llava_generate"
    kept = outputs.table(stage_dir).to_pylist()
    assert sorted(r["id"] for r in kept) == ["r0", "r1", "r2", "r3"]
    for row in kept:
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert row["gen_model"] == "gpt-4o-mini" and "@v1#" in row["gen_prompt"]
        assert json.loads(row["gen_params"])["temperature"] == 0.7
    assert {r["gen_prompt"].split("@")[0] for r in kept} <= {"conversation", "detail"}
    assert sum(r["gen_cache_hits"] for r in kept) == len(kept)  # the --force run read the cache
    rejected = outputs.table(stage_dir, rejected=True).to_pylist()
    assert {r["id"]: (r["reason"], r["gen_raw"]) for r in rejected} == {
        "r4": (
            "llava_generate: malformed answer (not JSON: Expecting value: line 1 column 1 (char 0))",
            "Sure! Here are the questions: 1. What is it?",
        ),
        "r5": (
            "llava_generate: refused (I'm sorry, I can't help with that.)",
            "I'm sorry, I can't help with that.",
        ),
    }
    # the token usage of every row, kept or rejected, is totalled in run.json
    run_json = json.loads((out / "run.json").read_text())
    sums = next(s for s in run_json["stages"] if s["folder"] == "01-llava_generate")["sums"]
    everything = kept + rejected
    assert sums == {
        "gen_prompt_tokens": sum(r["gen_prompt_tokens"] for r in everything),
        "gen_completion_tokens": sum(r["gen_completion_tokens"] for r in everything),
        "gen_cache_hits": len(everything),
    }
    assert sums["gen_prompt_tokens"] > 0
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_allava_recipe_pays_for_no_broken_image_and_writes_caption_and_qa(
    ray_session, tmp_path: Path
) -> None:
    source = tmp_path / "images.parquet"
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
    rows = [
        {"id": "a", "caption": "red", "images": [{"bytes": _png((255, 0, 0)), "path": None}]},
        {"id": "b", "caption": "cut", "images": [{"bytes": broken, "path": None}]},
    ]
    pq.write_table(rows_to_table(rows), source)
    out = tmp_path / "out"
    with ScriptedChatServer(allava_reply) as server:
        argv = ["--input", str(source), "--output", str(out), "--quiet"]
        argv += ["--allava_generate.base_url", server.url, "--allava_generate.api_key_env", KEY_ENV]
        argv += ["--allava_generate.cache_dir", str(tmp_path / "llm-cache")]
        assert recipe_main(allava.pipeline(), argv) == 0
    assert len(server.log) == 3  # caption, question, answer for the one good image
    assert set(outputs.rejected_reasons(out / "01-image_check")) == {"b"}
    (row,) = outputs.table(out / "02-allava_generate").to_pylist()
    assert (row["caption"], row["source_caption"]) == ("A red square on a white background.", "red")
    assert row["conversations"][0] == {
        "from": "human",
        "value": "<image>\nWhat colour is the square?",
    }
    assert row["gen_prompt"].startswith("allava_caption@v1#")


def test_a_run_killed_mid_stage_resumes_without_paying_twice(ray_session, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    n = 40
    pool = tmp_path / "pool"
    pool.mkdir()
    rows = _llava_rows([f"[ok] {i}" for i in range(n)])
    for k in range(4):  # four input shards, so the stage commits its work piece by piece
        pq.write_table(rows.slice(10 * k, 10), pool / f"part-{k}.parquet")
    cache = tmp_path / "llm-cache"
    state = {"closed": False, "answered": 0}

    def slow_reply(messages: list[dict[str, Any]]) -> Reply:
        time.sleep(0.1)  # a paid request takes a while: the kill lands among them
        if state["closed"]:
            # Ray workers can outlive a killed driver for a moment: after the kill they get no
            # answer at all (neither paid nor failed, which they could still commit as rejected
            # rows) until long after the re-run has finished.
            time.sleep(60)
            return 503, "closed", "stop"
        state["answered"] += 1
        return llava_reply(messages)

    with ScriptedChatServer(slow_reply) as server:
        cmd = [
            sys.executable,
            str(root / "pipelines" / "llava_instruct.py"),
            "--input",
            str(pool),
            "--input-format",
            "parquet",
            "--output",
            str(tmp_path / "out"),
            "--quiet",
            "--num-cpus",
            "2",
            "--llava_generate.base_url",
            server.url,
            "--llava_generate.api_key_env",
            KEY_ENV,
            "--llava_generate.cache_dir",
            str(cache),
            "--llava_generate.max_concurrency",
            "2",
        ]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        try:
            while state["answered"] < 8:
                if proc.poll() is not None:
                    pytest.fail(f"ended before the kill:\n{proc.stdout.read().decode()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("no request reached the server")
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, mid-stage
            state["closed"] = True
            proc.wait()
        # Responses in flight at the kill reach the cache or not: count once nothing moves.
        seen = None
        while seen != len(list(cache.rglob("*.json"))):
            seen = len(list(cache.rglob("*.json")))
            time.sleep(1.0)
        paid_before = seen
        assert 0 < paid_before < n

        state.update(closed=False, answered=0)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # the re-run paid exactly for the rows no stored response answered
        assert state["answered"] == n - paid_before
    kept = outputs.table(tmp_path / "out" / "01-llava_generate").to_pylist()
    assert sorted(r["id"] for r in kept) == sorted(f"r{i}" for i in range(n))
