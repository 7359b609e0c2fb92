"""Mixture specs end to end: sources read by their own readers, per-source filters, the
short-answer rule, caps and a text-only share against brute force, the before/after summary, a
re-run that recomputes only what changed, earlier outputs as sources, and spec errors."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from outputs import rejected_reasons, table
from PIL import Image

from warren.pipelines import mixture
from warren.stages.mixture_spec import SpecError, infer_tasks, parse_spec
from warren.stages.schema import rows_to_table
from warren.stages.select import uniform_key
from warren.stages.short_answer import LLAVA_SHORT_ANSWER
from warren.stages.source_filter import SourceFilter

SEED = 3


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """vqa.json: 40 image questions (ids 0-39, integers for even ones; answers short for even,
    long for odd); chat.json: 30 text-only conversations, 5 of them a lone question;
    caps.parquet: 20 caption rows with images."""
    root = tmp_path_factory.mktemp("sources")
    (root / "imgs").mkdir()
    vqa = []
    for i in range(40):
        (root / "imgs" / f"v{i}.jpg").write_bytes(_jpeg(i))
        answer = "red" if i % 2 == 0 else "a long answer about the colour of this thing"
        vqa.append(
            {
                "id": i if i % 2 == 0 else f"q{i}",
                "image": f"imgs/v{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (root / "vqa.json").write_text(json.dumps(vqa))
    chat = []
    for i in range(30):
        turns = [{"from": "human", "value": f"Tell me about topic {i}."}]
        if i >= 5:
            turns.append({"from": "gpt", "value": f"Topic {i} is interesting."})
        chat.append({"id": f"c{i}", "conversations": turns})
    (root / "chat.json").write_text(json.dumps(chat))
    caps = [
        {
            "id": f"cap{i}",
            "caption": f"a photo number {i}",
            "images": [{"bytes": _jpeg(100 + i), "path": None}],
        }
        for i in range(20)
    ]
    pq.write_table(rows_to_table(caps), root / "caps.parquet")
    return root


def _spec(root: Path, name: str, body: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def _smallest(ids: list[str], k: int, seed: int = SEED) -> set[str]:
    ranked = sorted(zip(uniform_key(ids, seed).tolist(), ids, strict=True))
    return {rid for _, rid in ranked[:k]}


MAIN_SPEC = """\
name: t
sources:
  vqa:
    path: vqa.json
    short_answer: true
    cap: 25
  chat:
    path: chat.json
    filter: "n_turns >= 2"
  captions:
    path: caps.parquet
balance:
  text_share: 0.2
  seed: 3
export:
  format: hf
  to: {export}
"""


@pytest.fixture(scope="module")
def main_run(ray_session, sources, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    spec = _spec(sources, "main", MAIN_SPEC.format(export=work / "hf"))
    out = work / "out"
    assert mixture.main([str(spec), "--output", str(out), "--quiet"]) == 0
    return spec, out, work


def test_mixture_reads_filters_caps_and_shares_exactly_as_brute_force(main_run):
    _, out, _ = main_run
    ingest = table(out / "00-ingest")
    assert ingest.num_rows == 85
    assert set(ingest.column("source").to_pylist()) == {"vqa", "chat", "captions"}
    assert "vqa/0" in ingest.column("id").to_pylist()  # integer id 0, prefixed by its source
    # a lone question is not a conversation (stages.conversation): rejected at ingest, so the
    # source's filter "n_turns >= 2" has nothing left to reject
    assert rejected_reasons(out / "00-ingest") == {
        f"chat/c{i}": "llava_json: turns do not alternate (ends with 'human', expected 'gpt')"
        for i in range(5)
    }
    assert rejected_reasons(out / "01-source_filter") == {}
    # caps: vqa keeps its 25 smallest keys; text share 0.2 with T = 25 chat rows and
    # M = 25 + 20 multimodal: N = min(25 / 0.2, 45 / 0.8) = 56.25 -> 56, text-only round(11.2) = 11
    vqa = _smallest([f"vqa/{i if i % 2 == 0 else f'q{i}'}" for i in range(40)], 25)
    chat = _smallest([f"chat/c{i}" for i in range(5, 30)], 11)
    captions = {f"captions/cap{i}" for i in range(20)}
    final = table(out / "04-export_check")
    assert set(final.column("id").to_pylist()) == vqa | chat | captions
    reasons = rejected_reasons(out / "03-balance")
    assert len(reasons) == 15 + 14
    assert all(
        r.startswith("balance: over source cap (source vqa: 25 of 40")
        for k, r in reasons.items()
        if k.startswith("vqa/")
    )
    assert all(
        r.startswith("balance: over text share (source chat, text-only: 11 of 25")
        for k, r in reasons.items()
        if k.startswith("chat/")
    )


def test_short_answers_get_the_instruction_and_long_ones_do_not(main_run):
    _, out, _ = main_run
    rows = table(out / "04-export_check").to_pylist()
    for r in rows:
        if r["source"] != "vqa":
            continue
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert question.endswith(LLAVA_SHORT_ANSWER) == (answer == "red"), r["id"]
    tasks = {r["source"]: r["task"] for r in rows}
    assert tasks == {"vqa": "single-turn", "chat": "text-only", "captions": "caption"}


def test_summary_counts_sources_and_tasks_before_and_after_balancing(main_run):
    _, out, work = main_run
    run = json.loads((out / "run.json").read_text())
    summary = run["mixture"]
    assert summary["before_stage"] == "02-short_answer"
    before = {k: v["rows"] for k, v in summary["before"]["by_source"].items()}
    after = {k: v["rows"] for k, v in summary["after"]["by_source"].items()}
    assert before == {"vqa": 40, "chat": 25, "captions": 20}
    assert after == {"vqa": 25, "chat": 11, "captions": 20}
    assert summary["after"]["by_source"]["chat"]["share"] == pytest.approx(11 / 56, abs=1e-6)
    assert {k: v["rows"] for k, v in summary["after"]["by_task"].items()} == {
        "single-turn": 25,
        "caption": 20,
        "text-only": 11,
    }
    # and the export holds the final rows
    import datasets

    ds = datasets.load_from_disk(str(work / "hf"))
    assert sorted(ds["id"]) == sorted(table(out / "04-export_check").column("id").to_pylist())


def test_changing_the_share_reruns_only_balance_and_what_follows(main_run, tmp_path):
    spec, out, _ = main_run
    code = mixture.main(
        [str(spec), "--output", str(out), "--quiet", "--balance.text_share", "0.1", "--no-export"]
    )
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    status = {s["name"]: s["status"] for s in run["stages"]}
    assert status == {
        "ingest": "cached",
        "source_filter": "cached",
        "short_answer": "cached",
        "balance": "computed",
        "export_check": "computed",
    }
    # N = min(25 / 0.1, 45 / 0.9) = 50 -> 5 text-only rows
    assert run["mixture"]["after"]["by_source"]["chat"]["rows"] == 5


def test_an_earlier_output_is_a_source_of_its_kept_rows(main_run, sources, tmp_path):
    _, out, _ = main_run
    spec = _spec(
        tmp_path,
        "again",
        f"""\
        name: again
        sources:
          first: {{path: {out}}}
        export_check: {{require_conversations: false}}
        """,
    )
    out2 = tmp_path / "out2"
    assert mixture.main([str(spec), "--output", str(out2), "--quiet"]) == 0
    first = table(out / "04-export_check")
    again = table(out2 / "01-export_check")
    assert sorted(again.column("id").to_pylist()) == sorted(
        f"first/{i}" for i in first.column("id").to_pylist()
    )
    # the rows keep their task from the first mixture
    assert sorted(again.column("task").to_pylist()) == sorted(first.column("task").to_pylist())


def test_caption_rows_go_out_as_pretraining_pairs_in_the_json_formats(
    ray_session, sources, tmp_path, capsys
):
    spec = _spec(
        tmp_path,
        "llava",
        f"""\
        name: l
        sources:
          captions: {{path: {sources / "caps.parquet"}}}
          vqa: {{path: {sources / "vqa.json"}}}
        export: {{format: llava, to: {tmp_path / "llava"}}}
        """,
    )
    out = tmp_path / "out"
    assert mixture.main([str(spec), "--output", str(out), "--quiet"]) == 0
    assert rejected_reasons(out / "01-export_check") == {}
    assert "exported 60 rows (20 from captions)" in capsys.readouterr().out
    items = json.loads((tmp_path / "llava" / "llava.json").read_text())
    assert len(items) == 60 and all(isinstance(it["id"], str) for it in items)
    captions = {it["id"]: it for it in items if it["source"] == "captions"}
    assert sorted(captions) == sorted(f"captions/cap{i}" for i in range(20))
    for rid, it in captions.items():
        human, gpt = it["conversations"]
        # LCS-558K's form: the marker, a newline, one of LLaVA's brief-description instructions
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].endswith(".") and human["value"].count("<image>") == 1
        number = int(rid.rsplit("cap", 1)[1])
        assert gpt == {"from": "gpt", "value": f"a photo number {number}"}
        assert (tmp_path / "llava" / it["image"]).read_bytes() == _jpeg(100 + number)

    # The same run exported to LLaMA-Factory with the marker alone (LLaVA's `plain` pretraining).
    args = [str(spec), "--output", str(out), "--quiet", "--export-format", "sharegpt"]
    args += ["--export-to", str(tmp_path / "lf"), "--caption-template", "<image>"]
    assert mixture.main(args) == 0
    data = json.loads((tmp_path / "lf" / "data.json").read_text())
    pairs = {it["id"]: it["messages"] for it in data if it["source"] == "captions"}
    assert pairs["captions/cap7"] == [
        {"role": "user", "content": "<image>"},
        {"role": "assistant", "content": "a photo number 7"},
    ]
    assert len(data) == 60


def test_an_export_of_no_rows_makes_the_mixture_exit_2(ray_session, sources, tmp_path, capsys):
    # Rows with neither turns nor a caption are rejected by export_check (no format can hold
    # them): the run kept no rows, so it fails naming the stage and the reason, and exports none.
    bare = [{"id": f"b{i}", "images": [{"bytes": _jpeg(i), "path": None}]} for i in range(3)]
    pq.write_table(rows_to_table(bare), tmp_path / "bare.parquet")
    spec = _spec(
        tmp_path,
        "bare",
        f"""\
        name: bare
        sources:
          bare: {{path: {tmp_path / "bare.parquet"}}}
        export_check: {{require_conversations: false}}
        export: {{format: hf, to: {tmp_path / "hf"}}}
        """,
    )
    assert mixture.main([str(spec), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the run kept no rows: 01-export_check rejected all 3 rows it was given" in err
    assert "export_check: no conversations and no caption x3" in err
    assert not (tmp_path / "hf").exists()
    # A bad template is refused before the run starts.
    bad = [str(spec), "--output", str(tmp_path / "out2"), "--caption-template", "no marker"]
    assert mixture.main(bad) == 2
    assert "has 0 <image> markers" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


DEMO_SPEC = Path(__file__).resolve().parents[1] / "pipelines" / "mixtures" / "demo.yaml"


def test_the_demo_mixture_exports_every_kept_row_in_every_format(ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    kept = None
    for fmt in ("llava", "sharegpt", "hf"):
        dest = tmp_path / fmt
        args = [str(DEMO_SPEC), "--output", str(out), "--quiet", "--export-format", fmt]
        assert mixture.main([*args, "--export-to", str(dest)]) == 0, fmt
        final = table(out / "03-export_check")
        rows = {r["id"]: r for r in final.to_pylist()}
        # 120 sampled; export_check may reject a row with a reason (never silently lose one)
        rejected = rejected_reasons(out / "03-export_check")
        assert len(rows) + len(rejected) == 120 and len(rows) >= 119
        assert kept in (None, sorted(rows))
        kept = sorted(rows)
        assert all(r["caption"] and not r["conversations"] for r in rows.values())
        assert f"exported {len(rows)} rows ({len(rows)} from captions)" in capsys.readouterr().out
        if fmt == "hf":
            import datasets

            ds = datasets.load_from_disk(str(dest))
            got = dict(zip(ds["id"], ds["messages"], strict=True))
            assert ds["caption"] == [rows[i]["caption"] for i in ds["id"]]
            answers = {i: m[1]["content"][0]["text"] for i, m in got.items()}
        else:
            name = "llava.json" if fmt == "llava" else "data.json"
            items = json.loads((dest / name).read_text(encoding="utf-8"))
            key, value = ("conversations", "value") if fmt == "llava" else ("messages", "content")
            answers = {it["id"]: it[key][1][value] for it in items}
        assert answers == {i: r["caption"] for i, r in rows.items()}, fmt


# ---- spec errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ("sources: {a: {path: x.json, colour: red}}", r"sources.a: unknown key\(s\) \['colour'\]"),
        ('sources: {a: {path: "${NOT_SET_ANYWHERE}/x.json"}}', "NOT_SET_ANYWHERE is not set"),
        ("sources: {a: {path: x.json, cap: -3}}", "sources.a: cap must be an integer >= 0"),
        ("sources: {}", "name at least one source"),
        ("sources: {a: {format: parquet}}", "sources.a: path is required"),
        ("sources: {a: x.json}\nbalanse: {total: 3}", r"unknown key\(s\) \['balanse'\]"),
        ("sources: {a: x.json}\nexport: {format: llava}", "export needs a format and a `to`"),
        ("sources: [a, b]", "sources: expected a mapping"),
        ("sources: {a: x.json\n", "not valid YAML"),
    ],
)
def test_spec_mistakes_name_the_file_and_key(body, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(body, "/specs/m.yaml")


def test_relative_source_paths_are_relative_to_the_spec(tmp_path):
    spec = parse_spec("sources: {a: data/x.json, b: /abs/y.json, c: s3://b/z}", "/specs/m.yaml")
    assert [s.path for s in spec.sources] == ["/specs/data/x.json", "/abs/y.json", "s3://b/z"]
    assert spec.name == "m" and spec.prefix_ids


def test_balance_parameters_from_the_spec_are_checked(sources, tmp_path):
    spec = _spec(tmp_path, "bad", "sources: {a: x.json}\nbalance: {totl: 5}\n")
    assert mixture.main([str(spec)]) == 2
    spec = _spec(
        tmp_path, "bad2", "sources: {a: {path: x.json, cap: 5}}\nbalance: {source_caps: {a: 3}}\n"
    )
    with pytest.raises(SpecError, match="give source_caps as each source's cap"):
        mixture.build_stages(parse_spec(spec.read_text(), str(spec)))


# ---- source_filter and task types --------------------------------------------------------------


def test_source_filter_applies_each_sources_condition_and_null_is_not_met():
    batch = rows_to_table(
        [
            {"id": "1", "source": "a", "caption": "short"},
            {"id": "2", "source": "a", "caption": None},
            {"id": "3", "source": "b", "caption": "a much longer caption"},
            {
                "id": "4",
                "source": "c",
                "caption": "tiny",
                "images": [{"bytes": b"x", "path": None}],
            },
        ]
    )
    stage = SourceFilter(filters={"a": "LENGTH(caption) < 10", "*": "n_images > 0"})
    got = stage.process(batch).column("_reject").to_pylist()
    assert got == [
        None,
        "source_filter: condition not met (source a: LENGTH(caption) < 10)",
        "source_filter: condition not met (source b: n_images > 0)",
        None,
    ]
    with pytest.raises(ValueError, match="names column 'colour'"):
        SourceFilter(filters={"a": "colour = 'red'"}).process(batch)
    with pytest.raises(ValueError, match="cannot parse"):
        SourceFilter(filters={"a": "caption >"})


def test_task_types_are_inferred_from_images_and_turns():
    img = [{"bytes": b"x", "path": None}]
    q, a = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}
    rows = [
        {"id": "1", "caption": "c", "images": img},
        {"id": "2", "conversations": [q, a]},
        {"id": "3", "images": img, "conversations": [{"from": "system", "value": "s"}, q, a]},
        {"id": "4", "images": img, "conversations": [q, a, q, a]},
    ]
    assert infer_tasks(rows_to_table(rows)).to_pylist() == [
        "caption",
        "text-only",
        "single-turn",
        "multi-turn",
    ]


def test_infer_tasks_handles_an_empty_table():
    assert infer_tasks(rows_to_table([])).to_pylist() == []
    assert pa.types.is_string(infer_tasks(rows_to_table([])).type)


# ---- the shipped specs, on crafted stand-ins for their public datasets --------------------------

SPECS = Path(__file__).resolve().parents[1] / "pipelines" / "mixtures"


def _qa(i: int, image: str | None, answer: str) -> dict:
    item = {
        "id": i,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + f"Question {i}?"},
            {"from": "gpt", "value": answer},
        ],
    }
    if image:
        item["image"] = image
    return item


def test_the_bunny_695k_spec_drops_svits_text_part_and_reads_wizardlm(
    ray_session, tmp_path, monkeypatch
):
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    svit = []
    for i in range(12):
        if i % 3 == 0:  # SVIT-mix's ShareGPT part: text-only conversations
            svit.append(_qa(i, None, "a text-only answer"))
        else:
            (images / f"{i}.jpg").write_bytes(_jpeg(i))
            svit.append(_qa(i, f"coco/{i}.jpg", "an answer about the image"))
    (tmp_path / "SVIT_mix_665K.json").write_text(json.dumps(svit))
    wizard = [
        {
            "instruction": f"Explain idea {i}.",
            "input": "" if i % 2 else "some context",
            "output": f"Idea {i} ...",
        }
        for i in range(7)
    ]
    (tmp_path / "alpaca_evol_instruct_70k.json").write_text(json.dumps(wizard))
    monkeypatch.setenv("BUNNY_DATA", str(tmp_path))
    monkeypatch.setenv("BUNNY_IMAGES", str(tmp_path / "images"))
    out, dest = tmp_path / "out", tmp_path / "export"
    code = mixture.main(
        [str(SPECS / "bunny_695k.yaml"), "--output", str(out), "--export-to", str(dest), "--quiet"]
    )
    assert code == 0
    items = json.loads((dest / "llava.json").read_text())
    svit_ids = {it["id"] for it in items if it["source"] == "svit_mix_665k"}
    assert svit_ids == {f"svit_mix_665k/{i}" for i in range(12) if i % 3}
    # WizardLM's items have no ids: each gets a content-derived one, under its source
    wizard_turns = {
        it["conversations"][0]["value"]: it["conversations"][1]["value"]
        for it in items
        if it["source"] == "wizardlm_evol_instruct_70k"
    }
    assert wizard_turns == {
        ("Explain idea {0}." if i % 2 else "Explain idea {0}.\n\nsome context").format(
            i
        ): f"Idea {i} ..."
        for i in range(7)
    }
    assert len(items) == 8 + 7
    by_id = {it["id"]: it for it in items}
    assert by_id["svit_mix_665k/1"]["image"] == "coco/1.jpg"
    assert (dest / "coco" / "1.jpg").read_bytes() == _jpeg(1)


def test_the_llava_665k_spec_caps_each_source_and_marks_short_answers(
    ray_session, tmp_path, monkeypatch
):
    data, images = tmp_path / "json", tmp_path / "images"
    data.mkdir()
    (images / "coco").mkdir(parents=True)
    (images / "coco" / "a.jpg").write_bytes(_jpeg(7))
    names = [
        "llava_instruct_158k",
        "sharegpt_40k",
        "vqav2",
        "gqa",
        "okvqa",
        "ocrvqa",
        "a_okvqa",
        "textcaps",
        "refcoco",
        "vg",
    ]
    for name in names:
        text_only = name == "sharegpt_40k"
        items = [
            _qa(i, None if text_only else "coco/a.jpg", "yes" if i % 2 else "a longer answer here")
            for i in range(4)
        ]
        (data / f"{name}.json").write_text(json.dumps(items))
    monkeypatch.setenv("LLAVA15_DATA", str(data))
    monkeypatch.setenv("LLAVA15_IMAGES", str(images))
    out = tmp_path / "out"
    code = mixture.main(
        [str(SPECS / "llava_v1_5_665k.yaml"), "--output", str(out), "--no-export", "--quiet"]
    )
    assert code == 0
    rows = table(out / "03-export_check").to_pylist()
    assert len(rows) == 40  # every source is far under its cap: nothing sampled away
    marked = {"vqav2", "gqa", "okvqa", "ocrvqa"}
    for r in rows:
        short = r["conversations"][1]["value"] == "yes"
        has = r["conversations"][0]["value"].endswith(LLAVA_SHORT_ANSWER)
        assert has == (short and r["source"] in marked), r["id"]
    tasks = {r["source"]: r["task"] for r in rows}
    assert tasks["vqav2"] == "vqa" and tasks["sharegpt_40k"] == "text-only"
