"""The front door: registered recipes, commands whose flags are their functions' parameters,
per-stage resources from the command line, and `warren describe` without Ray."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from worker_env import worker_pythonpath

from warren.pipelines import cli, commands, recipe, registry
from warren.pipelines.plan import column_problems
from warren.pipelines.runner import Pipeline
from warren.stages.base import BatchStage, Resources
from warren.stages.embed import Embed
from warren.stages.recaption import Recaption

ROOT = Path(__file__).resolve().parents[1]
# Written out by hand: the published recipes this repository ships (not mixture: it takes a spec).
SHIPPED = {
    "allava",
    "basic_filter",
    "bunny_pretrain",
    "datacomp_filter",
    "demo",
    "llama3_pretrain",
    "llava_instruct",
    "points_pretrain",
    "semdedup",
    "sharegpt4v_recaption",
}


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


# ---- registry ----------------------------------------------------------------------------------


def test_the_registered_recipes_are_the_shipped_ones_and_nothing_else():
    assert set(registry.names()) == SHIPPED
    assert not hasattr(cli, "NOT_RECIPES")
    for name in SHIPPED:
        assert registry.get(name)().name == name


def test_a_recipe_registered_anywhere_runs_by_name(capsys, tmp_path):
    @registry.recipe("cli_test_recipe")
    def build() -> Pipeline:
        return Pipeline("cli_test_recipe", [Embed()], "a recipe defined in a test")

    try:
        assert "cli_test_recipe" in registry.names()
        assert cli.main(["describe", "cli_test_recipe", "--input", str(tmp_path)]) == 0
        assert "01 embed v" in capsys.readouterr().out
        with pytest.raises(ValueError, match="registered twice"):
            registry.recipe("demo")(build)
    finally:
        registry._RECIPES.pop("cli_test_recipe", None)


def test_an_unknown_recipe_is_exit_2_listing_the_known_ones(capsys):
    assert cli.main(["run", "no_such_recipe"]) == 2
    assert cli.main(["describe", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'no_such_recipe'" in err and "bunny_pretrain" in err


# ---- every command's flags are its function's parameters ----------------------------------------


@pytest.mark.parametrize("name", ["recipes", "report", "explain", "export"])
def test_generated_commands_take_exactly_their_functions_parameters(name):
    assert _dests(_subparser(name)) == _params(commands.COMMANDS[name])


def test_run_takes_exactly_the_flags_of_a_recipe_script():
    pipeline = registry.get("bunny_pretrain")()
    flags = {d for d in _dests(recipe.build_parser(pipeline, "out")) if "." not in d}
    assert flags | {"recipe", "params", "resources"} == _params(commands.run)
    # and the function the scripts' main calls takes the same
    assert _params(recipe.execute) - {"pipeline"} == _params(commands.run) - {"recipe"}


def test_describe_takes_exactly_its_functions_parameters():
    pipeline = registry.get("demo")()
    dests = _dests(cli.describe_parser("demo", pipeline))
    assert {d for d in dests if "." not in d} | {"recipe", "params", "resources"} == _params(
        commands.describe
    )


def test_mixture_takes_its_own_flags_and_the_run_flags_but_the_input():
    from warren.pipelines import mixture

    own = set(vars(mixture._split_args([])[0])) - {"help"}
    pipeline = registry.get("demo")()
    run_flags = {d for d in _dests(recipe.build_parser(pipeline, "o")) if "." not in d}
    expected = own | (run_flags - {"input", "input_format", "input_option"})
    assert expected | {"params", "resources"} == _params(commands.mixture)


def test_train_takes_exactly_the_trainers_flags():
    pytest.importorskip("torch")
    from warren.trainers.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # training_args: the TrainingArguments flags that follow warren's, parsed apart.
    assert _dests(commands.train_parser()) | {"training_args"} == fields == _params(commands.train)
    assert commands.train_parser().parse_args(["--data", "d", "--output", "o"]).stage == "align"


def test_train_on_missing_data_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    pytest.importorskip("torch")
    missing = str(tmp_path / "no_such_run")
    argv = ["train", "--data", missing, "--output", str(tmp_path / "o"), "--vision", "v"]
    assert cli.main([*argv, "--llm", "l", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warren train: ") and "no_such_run" in err and "Traceback" not in err


# ---- per-stage resources -----------------------------------------------------------------------


class _FakeRunner:
    seen: list = []

    def __init__(self, pipeline, *args, **kwargs):
        _FakeRunner.seen.append(pipeline)

    def run(self):
        return []


def test_resource_flags_reach_the_stage_instance_and_not_its_class(monkeypatch, tmp_path):
    monkeypatch.setattr(recipe, "Runner", _FakeRunner)
    _FakeRunner.seen.clear()
    argv = [
        "run", "bunny_pretrain", "--output", str(tmp_path), "--no-report", "--quiet",
        "--embed.num_gpus", "0.5", "--embed.concurrency", "8", "--embed.batch_size", "256",
        "--image_check.num_cpus", "2", "--image_check.concurrency", "2,6",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    stages = {s.name: s for s in _FakeRunner.seen[0].stages}
    assert stages["embed"].resources == Resources(
        num_cpus=1.0, num_gpus=0.5, batch_size=256, concurrency=(8, 8)
    )
    assert stages["image_check"].num_cpus == 2.0
    assert stages["image_check"].concurrency == (2, 6)
    assert Embed.resources == Embed().resources and Embed().num_gpus == Embed.resources.num_gpus
    # a resource is not a parameter: the cache key is the same
    assert stages["embed"].params_hash == Embed(model=stages["embed"].params.model).params_hash
    # the demo parameters still apply (the demo CLIP), next to the resources
    assert stages["embed"].params.model == recipe.DEMO_CLIP


def test_a_global_stage_takes_no_resources_and_says_so(monkeypatch, tmp_path, capsys):
    # Its Ray Data operations size themselves to the cluster: a value would do nothing.
    monkeypatch.setattr(recipe, "Runner", _FakeRunner)
    _FakeRunner.seen.clear()
    argv = ["run", "bunny_pretrain", "--output", str(tmp_path), "--cluster.num_cpus", "2"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "unrecognized arguments: --cluster.num_cpus" in capsys.readouterr().err
    code = commands.run(
        "bunny_pretrain", output=str(tmp_path), resources={"cluster": {"num_cpus": 2}}
    )
    assert code == 2 and not _FakeRunner.seen
    assert "cluster: a global stage sizes its work to the cluster" in capsys.readouterr().err


def test_the_python_api_takes_the_same_resources(monkeypatch, tmp_path):
    monkeypatch.setattr(recipe, "Runner", _FakeRunner)
    _FakeRunner.seen.clear()
    code = commands.run(
        "demo",
        output=str(tmp_path),
        no_report=True,
        resources={"image_check": {"num_gpus": 0.25, "concurrency": (1, 3)}},
        params={"caption_check": {"min_chars": 5}},
    )
    assert code == 0
    stages = {s.name: s for s in _FakeRunner.seen[0].stages}
    assert stages["image_check"].num_gpus == 0.25 and stages["image_check"].concurrency == (1, 3)
    assert stages["caption_check"].params.min_chars == 5


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--embed.concurrency", "0", "must be at least 1"),
        ("--embed.concurrency", "8,2", "MIN must not exceed MAX"),
        ("--embed.concurrency", "a,b", "expected a whole number"),
        ("--embed.num_gpus", "-1", "must be >= 0"),
        ("--embed.num_gpus", "nan", "must be a finite number >= 0"),
        ("--embed.num_cpus", "inf", "must be a finite number >= 0"),
        ("--embed.batch_size", "many", "expected a whole number"),
    ],
)
def test_a_bad_resource_value_is_an_error_naming_the_flag(flag, value, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "bunny_pretrain", flag, value, "--describe"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {says}" in err


def test_a_bad_resource_from_python_names_the_stage(capsys, tmp_path):
    code = commands.run(
        "demo", output=str(tmp_path), describe=True, resources={"image_check": {"gpus": 1}}
    )
    assert code == 2
    assert "stage image_check: unknown resource 'gpus'" in capsys.readouterr().err
    nan = {"image_check": {"num_gpus": float("nan")}}
    assert commands.run("demo", output=str(tmp_path), describe=True, resources=nan) == 2
    assert "num_cpus and num_gpus must be finite and >= 0" in capsys.readouterr().err
    code = commands.run("demo", output=str(tmp_path), describe=True, resources={"embed": {}})
    assert code == 2
    assert "resources for 'embed': no such stage" in capsys.readouterr().err


def test_a_bad_stage_parameter_is_the_user_s_error_and_describe_writes_nothing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["describe", "demo", "--caption_check.min_chars", "-5"]) == 2
    err = capsys.readouterr().err
    assert err == "error: stage caption_check: caption_check: min_chars must be >= 0, got -5\n"
    assert list(tmp_path.iterdir()) == []  # no warren-out/demo/logs/run.log in the cwd


def test_a_model_stage_given_no_cpus_gets_an_actor_pool(ray_session):
    from warren.pipelines.ray_session import map_resources

    args = map_resources(Embed(resources={"num_cpus": 0, "num_gpus": 0}))  # was ZeroDivisionError
    assert args["num_cpus"] == 0 and args["compute"].min_size == 1
    assert args["compute"].max_size >= 1


def test_a_stage_with_a_parameter_of_a_resources_name_keeps_both():
    parser = recipe.build_parser(Pipeline("t", [Recaption()]), "o")
    args = parser.parse_args(
        ["--recaption.batch_size", "4", "--recaption.resources.batch_size", "32"]
    )
    params, resources = recipe.stage_flags(args, [Recaption()])
    assert params == {"recaption": {"batch_size": 4}}
    assert resources == {"recaption": {"batch_size": 32}}
    stage = recipe.apply_stage_flags([Recaption()], params, resources)[0]
    assert stage.params.batch_size == 4 and stage.batch_size == 32


# ---- describe ----------------------------------------------------------------------------------


class _NeedsScore(BatchStage):
    name = "needs_score"
    requires = ("clip_score",)

    def process(self, batch: pa.Table) -> pa.Table:
        return batch


class _AddsScore(_NeedsScore):
    name = "adds_score"
    requires = ()
    adds = ("clip_score",)


def test_the_column_check_names_the_stage_and_the_missing_column():
    problems = column_problems([_NeedsScore()], known_stages=[_AddsScore])
    assert problems == [
        "needs_score: requires column 'clip_score', which no stage before it adds "
        "(the `adds_score` stage adds it)"
    ]
    assert column_problems([_AddsScore(), _NeedsScore()]) == []
    assert column_problems([_NeedsScore(), _AddsScore()]) == [
        "needs_score: requires column 'clip_score', which no stage before it adds "
        "(the `adds_score` stage adds it, but runs after it)"
    ]


def test_describe_prints_stages_columns_and_resources_without_ray_or_the_trainers():
    code = (
        "import sys\n"
        "from warren.pipelines import cli\n"
        "assert cli.main(['describe', 'bunny_pretrain', '--embed.num_gpus', '0.5']) == 0\n"
        "assert cli.main(['describe', 'sharegpt4v_recaption']) == 0\n"
        "print('IMPORTED', 'ray' in sys.modules, "
        "any(m.startswith('warren.trainers') for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**_env(), "RAY_ADDRESS": ""},
        check=True,
    ).stdout
    assert "IMPORTED False False" in out
    lines = out.splitlines()
    names = [line.split()[1] for line in lines if line.strip()[:2].isdigit()]
    assert names[:9] == [
        "ingest:", "image_check", "caption_check", "embed", "cluster", "semdedup", "clip_score",
        "centroid_window", "sample",
    ]  # fmt: skip
    embed = lines.index(next(line for line in lines if line.strip().startswith("03 embed")))
    block = "\n".join(lines[embed : embed + 5])
    assert "(batch)" in block and "num_gpus=0.5" in block and "batch_size=256" in block
    assert "requires:" in block and "adds:" in block and "params:" in block
    assert "columns: ok" in out


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": worker_pythonpath()}


def test_a_recipe_script_is_an_alias_of_warren_run(tmp_path):
    """Same output for --describe, same exit code for a bad flag."""

    def call(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, env=_env()
        )

    script = call(
        str(ROOT / "pipelines" / "demo.py"), "--describe", "--caption_check.min_chars", "3"
    )
    front = call("-m", "warren.pipelines.cli", "run", "demo", "--describe", "--caption_check.min_chars", "3")  # fmt: skip
    assert script.returncode == front.returncode == 0
    assert script.stdout == front.stdout and "'min_chars': 3" in script.stdout
    bad_script = call(str(ROOT / "pipelines" / "demo.py"), "--image_check.num_gpus", "x")
    bad_front = call("-m", "warren.pipelines.cli", "run", "demo", "--image_check.num_gpus", "x")
    assert bad_script.returncode == bad_front.returncode == 2
    assert "argument --image_check.num_gpus" in bad_script.stderr
    assert "argument --image_check.num_gpus" in bad_front.stderr


def test_the_mixture_function_passes_its_flags_to_the_mixture_command(capsys, tmp_path):
    spec = str(ROOT / "pipelines" / "mixtures" / "demo.yaml")
    code = commands.mixture(
        spec,
        output=str(tmp_path),
        describe=True,
        params={"balance": {"total": 100}},
        resources={"export_check": {"num_cpus": 2, "concurrency": (1, 4)}},
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if " balance v" in line)
    assert "'total': 100" in lines[at + 1]
    at = next(i for i, line in enumerate(lines) if " export_check v" in line)
    assert "num_cpus=2.0" in lines[at + 2] and "concurrency=1,4" in lines[at + 2]


def test_a_run_that_kept_no_rows_fails_and_says_where_they_went(ray_session, tmp_path, capsys):
    # every demo caption is shorter than 9,999 characters: caption_check rejects all it gets
    argv = ["run", "demo", "--output", str(tmp_path / "out"), "--quiet", "--no-report"]
    assert cli.main([*argv, "--caption_check.min_chars", "9999"]) == 2
    err = capsys.readouterr().err
    assert "the run kept no rows: 02-caption_check rejected all 653 rows it was given" in err
    assert "its rejected/ shards hold them" in err
