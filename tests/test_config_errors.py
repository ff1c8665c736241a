"""Configuration mistakes are errors: one line naming the fix, exit code 2, before any model is
loaded and before anything is written. Nothing here loads a model (the tests make sure of it)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from harness.errors import ConfigError, UserError
from harness.runs import config, driver


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: every error below must come before one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    import harness.models

    monkeypatch.setattr(harness.models, "load_model", refuse)
    monkeypatch.setattr(driver.SequentialRun, "load_model", refuse)


def run_main(argv, capsys):
    rc = driver.main(["--no_progress", *argv])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def write(tmp_path, **cfg):
    base = dict(methods=["memit"], num_edits=4, edit_batch_size=2, eval_every=2,
                output_dir=str(tmp_path / "out"), tasks=["counterfact_edit"])
    base.update(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


BAD_CONFIGS = [
    ({"num_edits": -1}, "num_edits must be >= 0"),
    ({"num_edits": 2.5}, "num_edits must be a whole number, got 2.5"),
    ({"num_edits": "ten"}, "num_edits must be a whole number, got 'ten'"),
    ({"edit_batch_size": 0}, "edit_batch_size must be >= 1"),
    ({"eval_every": 3}, "eval_every (3) must be a multiple of edit_batch_size (2)"),
    ({"num_edits": 100_000, "eval_every": 100_000}, "num_edits=100000 but counterfact holds"),
    ({"num_edit": 4}, "'num_edit' (did you mean 'num_edits'?)"),
    ({"methods": ["memt"]}, "unknown method 'memt' (did you mean 'memit'?)"),
    ({"methods": ["memit-prune"]}, "only lyaplock takes an add-on base"),
    ({"overrides": {"memit": {"aplha": 10}}}, "'aplha' (did you mean 'alpha'?)"),
    ({"overrides": {"memti": {"alpha": 10}}}, "'memti' (did you mean 'memit'?)"),
    ({"overrides": {"memit": {"v_lr": "fast"}}}, "hyper-parameter v_lr must be a number, got 'fast'"),
    ({"hparams": {"memit": "gpt-9"}}, "hparams 'gpt-9' not found for memit"),
    ({"model": "/nowhere/model.gguf"}, "model /nowhere/model.gguf: no such file"),
    ({"edit_data": "/nowhere/edits.jsonl"}, "edit_data='/nowhere/edits.jsonl' is neither a dataset name"),
    ({"zsre_target": "alternative"}, "zsre_target must be 'answers' or 'alt'"),
    ({"tasks": ["counterfact_edit", "humaneval_edit"]},
     "tasks humaneval_edit run model-written programs (in the sandbox); lm-eval runs them only when allowed: "
     "add confirm_run_unsafe_code: true"),
]


@pytest.mark.parametrize("cfg,message", BAD_CONFIGS, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD_CONFIGS)])
def test_a_bad_run_config_is_one_line_and_exit_2_before_anything_is_loaded_or_written(
        cfg, message, tmp_path, capsys, no_model_load):
    rc, lines = run_main(["--config", write(tmp_path, **cfg)], capsys)
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("seqedit run: error: "), lines
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # no manifest for a config that did not validate


@pytest.mark.parametrize("flags,message", [
    (["--overrides", "aplha=10"], "'aplha' (did you mean 'alpha'?)"),
    (["--num_edits", "-1"], "num_edits must be >= 0"),
    (["--methods", "memit,memit"], "lists a method twice"),
    (["--config", "/nowhere/run.yaml"], "--config /nowhere/run.yaml: No such file"),
])
def test_bad_flags_are_one_line_too(flags, message, tmp_path, capsys, no_model_load):
    rc, lines = run_main(["--output_dir", str(tmp_path / "out"), *flags], capsys)
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines


def test_the_code_tasks_are_the_unsafe_ones_and_run_once_allowed(tmp_path):
    """Read from the tasks' own YAML: exactly the tasks that execute generated code, and a config
    that allows them validates."""
    assert config.unsafe_task_names() == {"humaneval_edit", "mbpp_edit"}
    cfg = config.RunConfig(methods=["memit"], output_dir=str(tmp_path), confirm_run_unsafe_code=True,
                           tasks=["counterfact_edit", "humaneval_edit", "mbpp_edit"])
    cfg.validate()
    with pytest.raises(ConfigError, match="tasks humaneval_edit, mbpp_edit run model-written programs"):
        dataclasses.replace(cfg, confirm_run_unsafe_code=False).validate()


def test_overrides_for_every_method_reach_each_method_and_per_method_ones_win(tmp_path):
    args = config.build_parser().parse_args(["--overrides", "alpha=10,v_lr=0.25", "--methods", "memit,lyaplock"])
    assert args.overrides == {"*": {"alpha": 10, "v_lr": 0.25}}
    cfg = config.RunConfig(methods=["memit", "lyaplock"], output_dir=str(tmp_path),
                           overrides={"*": {"alpha": 10}, "lyaplock": {"alpha": 3}})
    cfg.validate()
    assert cfg.overrides_for("memit") == {"alpha": 10} and cfg.overrides_for("lyaplock") == {"alpha": 3}


def test_debug_shows_the_traceback(tmp_path, no_model_load):
    with pytest.raises(ConfigError, match="num_edits must be >= 0"):
        driver.main(["--debug", "--output_dir", str(tmp_path / "out"), "--num_edits", "-1"])


def test_the_command_line_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--output_dir", str(tmp_path / "o"),
                           "--edit_batch_size", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["seqedit run: error: edit_batch_size must be >= 1, got 0"]


def test_every_seqedit_run_flag_has_a_help_line_with_its_default():
    parser = config.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "(default: " in action.help, action.option_strings


def test_a_run_config_that_is_not_a_mapping_is_named(tmp_path, capsys, no_model_load):
    path = tmp_path / "run.yaml"
    path.write_text("- memit\n- lyaplock\n")
    rc, lines = run_main(["--config", str(path)], capsys)
    assert rc == 2 and "expected a mapping of run-config keys, got list" in lines[0]


# -------------------------------------------------------------------- the wrappers

@pytest.mark.parametrize("kwargs,message", [
    ({"aplha": 10}, "'aplha' (did you mean 'alpha'?)"),
    ({"num_edit": 4}, "'num_edit' (did you mean 'num_edits'?)"),
    ({"num_edits": -1}, "num_edits must be >= 0, got -1"),
    ({"num_edits": "2.5"}, "num_edits must be a whole number, got '2.5'"),
    ({"edit_batch_size": 0}, "edit_batch_size must be >= 1, got 0"),
    ({"num_edits": 100_000}, "num_edits=100000 but counterfact holds"),
    ({"layers": "4-x"}, "layers='4-x': expected a range"),
    ({"v_lr": "fast"}, "hyper-parameter v_lr must be a number"),
])
def test_a_wrapper_refuses_bad_model_args_before_loading_a_model(kwargs, message, no_model_load):
    from harness.models import MEMITLM

    with pytest.raises(UserError) as info:
        MEMITLM(**kwargs)
    assert message in str(info.value)


def test_the_wrappers_accept_every_name_they_document():
    from harness.editors.hparams import EditHparams
    from harness.models import EditingLM

    valid = EditingLM.valid_argument_names()
    # lm-eval's own HFLM arguments and ours, and every hyper-parameter
    assert {"pretrained", "num_edits", "edit_data", "batch_size", "max_length", "add_bos_token",
            "revision"} <= valid
    assert EditHparams.keys() <= valid


def test_lm_eval_cli_turns_an_unknown_model_arg_into_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SEQEDIT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "memit_hf", "--model_args", "aplha=10",
         "--tasks", "counterfact_edit", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lm_eval: error:")]
    assert len(errors) == 1 and "'aplha' (did you mean 'alpha'?)" in errors[0], proc.stderr[-3000:]


@pytest.mark.parametrize("argv,message", [
    (["hub-cache", "nyu-mll/glue", "/nowhere"], "seqedit hub-cache: error: /nowhere: no such directory"),
    (["leaderboard", "/nowhere"], "seqedit leaderboard: error: /nowhere is not a run directory"),
    (["report", "/nowhere"], "seqedit report: error: /nowhere is not a run directory"),
])
def test_every_seqedit_command_reports_a_user_mistake_in_one_line(argv, message, capsys):
    from harness.cli import main

    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines
