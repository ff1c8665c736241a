"""Package foundation: architectures, model loading, edit-data loaders, lm-eval registration."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.arch import UnknownArchitectureError, architecture_for, get_module
from harness.data import (
    DataSourceError,
    EditRequest,
    MalformedRecordError,
    load_counterfact,
    load_edit_data,
    load_zsre,
    parse_counterfact_records,
    parse_zsre_records,
)
from harness.data.edits import SAMPLE_FILES, read_records
from harness.testing import tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- architectures
@pytest.mark.parametrize("arch,module_type,transposed", [
    ("llama", "Linear", False), ("gpt2", "Conv1D", True), ("gptj", "Linear", False)])
def test_each_architecture_finds_its_mlp_projection(arch, module_type, transposed):
    model, tok = tiny_model(arch)
    a = architecture_for(model)
    assert a.transposed is transposed
    proj = get_module(model, a.mlp_out_name(2))
    assert type(proj).__name__ == module_type
    d_ff, d_model = 128, 64
    # stored orientation: Conv1D keeps (d_in, d_out), Linear (d_out, d_in)
    assert tuple(proj.weight.shape) == ((d_ff, d_model) if transposed else (d_model, d_ff))
    assert a.n_layers(model.config) == 4
    get_module(model, a.final_norm)
    get_module(model, a.lm_head)


def test_gemma3_is_declared():
    from transformers import Gemma3TextConfig

    a = architecture_for(Gemma3TextConfig(num_hidden_layers=2))
    assert a.mlp_out_name(1) == "model.layers.1.mlp.down_proj"


def test_unknown_architecture_names_what_to_declare():
    from transformers import BertConfig

    with pytest.raises(UnknownArchitectureError) as err:
        architecture_for(BertConfig())
    msg = str(err.value)
    assert "bert" in msg and "mlp_out" in msg and "architectures.yaml" in msg


def test_embedded_model_loads_and_knows_a_fact():
    import torch

    from harness.loading import default_model_path, load_model

    path = default_model_path()
    assert path.suffix == ".gguf" and path.exists()
    model, tok = load_model()
    a = architecture_for(model)
    assert a.name == "llama" and a.n_layers(model.config) == 30
    ids = tok("The mother tongue of Danielle Darrieux is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "French" in tok.decode(out[0, ids.shape[1]:])


def test_pretrained_accepts_gguf_file_and_rejects_missing(tmp_path):
    from harness.loading import ModelNotFoundError, resolve_pretrained

    name, gguf = resolve_pretrained(None)
    assert gguf.endswith(".gguf") and Path(name) == Path(gguf).parent
    assert resolve_pretrained(gguf) == (name, gguf)
    assert resolve_pretrained("gpt2-xl") == ("gpt2-xl", None)
    with pytest.raises(ModelNotFoundError):
        resolve_pretrained(str(tmp_path / "missing.gguf"))


# ---------------------------------------------------------------- edit data
def test_counterfact_sample_round_trips():
    raw = read_records(SAMPLE_FILES["counterfact"])
    reqs = load_counterfact()
    assert len(reqs) == len(raw) == 500
    assert [r.case_id for r in reqs] == list(range(500))
    first = reqs[0]
    assert first.prompt == "The mother tongue of {} is" and first.subject == "Danielle Darrieux"
    assert (first.target_new, first.target_true) == ("English", "French")
    for rec, req in zip(raw, reqs):
        assert req.rewrite_prompt == rec["prompt"]
        assert req.paraphrase_prompts == [rec["rephrase_prompt"]]
        assert req.neighborhood_prompts == [rec["locality_prompt"]]
        assert req.neighborhood_target == rec["locality_ground_truth"]
        assert EditRequest.from_dict(req.to_dict()) == req


def test_zsre_sample_round_trips_with_both_targets():
    raw = read_records(SAMPLE_FILES["zsre"])
    reqs = load_zsre()
    alt = load_zsre(target="alt")
    assert len(reqs) == len(raw) == 500
    for rec, req, a in zip(raw, reqs, alt):
        assert req.rewrite_prompt == rec["src"]
        assert req.target_new == rec["answers"][0] and a.target_new == rec["alt"]
        assert req.paraphrase_prompts == [rec["rephrase"]]
        assert req.neighborhood_prompts == [rec["loc"] + "?"]
        assert req.neighborhood_target == rec["loc_ans"]
        assert req.target_true is None and req.dataset == "zsre"


def test_rome_schema_counterfact():
    reqs = load_counterfact(FIXTURES / "counterfact_rome_schema.json")
    r = reqs[0]
    assert r.schema == "rome" and r.relation_id == "P103" and r.target_new_id == "Q1860"
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 2
    assert r.neighborhood_target == "French" and len(r.generation_prompts) == 2


def test_full_easyedit_splits_from_a_data_dir(monkeypatch):
    shared = REPO.parent / "shared" / "data"
    if not (shared / "counterfact").exists():
        message = "../shared/data is not beside this checkout"
        if os.environ.get("CI"):  # CI always has it: a skip there would hide a broken layout
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("SEQEDIT_DATA_DIR", str(shared))
    reqs = load_counterfact()
    assert len(reqs) == 21919 and reqs[-1].case_id == 21918
    assert len(load_zsre()) == 1037
    # the papers' edit stream: EasyEdit's edit split in its own order
    stream = load_edit_data("counterfact:edit")
    assert len(stream) == 10_000 and [r.case_id for r in stream[:4]] == [0, 1, 4, 5]
    every_zsre = load_edit_data("zsre:all")
    assert len(every_zsre) == 2037 and [r.case_id for r in every_zsre[1036:1038]] == [1036, 1037]
    assert len({(r.subject, r.prompt) for r in every_zsre}) == 2037
    monkeypatch.delenv("SEQEDIT_DATA_DIR")
    with pytest.raises(DataSourceError, match="counterfact:edit reads .* which is not set"):
        load_edit_data("counterfact:edit")


GOOD_CF = {"case_id": 7, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
           "ground_truth": "Paris", "rephrase_prompt": "France's capital is", "locality_prompt": "x",
           "locality_ground_truth": "Paris"}


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("target_new"), "target_new"),
    (lambda r: r.update(target_new="  "), "target_new"),
    (lambda r: r.update(subject="Germany"), "subject"),
    (lambda r: r.pop("ground_truth"), "ground_truth"),
])
def test_malformed_easyedit_records_are_rejected(mutate, field):
    rec = dict(GOOD_CF)
    mutate(rec)
    with pytest.raises(MalformedRecordError) as err:
        parse_counterfact_records([dict(GOOD_CF), rec])
    assert "record 1" in str(err.value) and "case_id 7" in str(err.value) and field in str(err.value)


def test_malformed_rome_records_are_rejected():
    recs = json.loads((FIXTURES / "counterfact_rome_schema.json").read_text())
    bad = json.loads(json.dumps(recs[0]))
    bad["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    with pytest.raises(MalformedRecordError, match=r"record 0 .*requested_rewrite.prompt.*\{\}"):
        parse_counterfact_records([bad])
    bad = json.loads(json.dumps(recs[0]))
    bad["requested_rewrite"]["target_new"]["str"] = ""
    with pytest.raises(MalformedRecordError, match="str"):
        parse_counterfact_records([bad])
    with pytest.raises(MalformedRecordError, match="requested_rewrite"):
        parse_counterfact_records([{"case_id": 3, "foo": 1}])


def test_malformed_zsre_records_are_rejected():
    good = read_records(SAMPLE_FILES["zsre"])[0]
    for field, value in [("answers", []), ("loc_ans", None), ("src", "no subject here"), ("alt", "")]:
        rec = dict(good)
        rec[field] = value
        target = "alt" if field == "alt" else "answers"
        with pytest.raises(MalformedRecordError, match=field if field != "src" else "subject"):
            parse_zsre_records([rec], target=target)


def test_data_sources_explicit_path_and_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "cf.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps(GOOD_CF) + "\n")
    assert load_edit_data(str(path))[0].case_id == 7
    with pytest.raises(DataSourceError) as err:
        load_edit_data("counterfact", limit=10_000)
    assert "SEQEDIT_DATA_DIR" in str(err.value) and "edit_data=" in str(err.value)
    monkeypatch.setenv("SEQEDIT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    # no local copy, and the download fails offline (or succeeds on a connected machine)
    import harness.data.edits as edits

    monkeypatch.setattr(edits.urllib.request, "urlretrieve",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.raises(DataSourceError) as err:
        load_counterfact(full=True)
    assert "SEQEDIT_DATA_DIR" in str(err.value) and "edit_data=" in str(err.value)


# ---------------------------------------------------------------- lm-eval registration
def _lm_eval_command() -> list[str]:
    # the console script installed beside this interpreter, even when its bin/ is not on PATH;
    # without one (a venv that reuses system site-packages), the same CLI through this interpreter,
    # never whichever lm_eval PATH finds first, which may belong to another environment
    beside = Path(sys.executable).with_name("lm_eval")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "lm_eval"]


def _run(cmd, timeout=600, env=None):
    cmd = [*_lm_eval_command(), *cmd[1:]] if cmd[0] == "lm_eval" else cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/",
                          env={**os.environ, **(env or {})})


def test_registration_in_a_fresh_interpreter():
    code = ("from lm_eval.api.registry import get_model, model_registry\n"
            "import harness\n"
            "assert get_model('hf').__name__ == 'HFLM'\n"
            "for name in harness.MODEL_NAMES: assert name in model_registry, name\n"
            "print(get_model('lyaplock_hf').__name__)\n"
            "from lm_eval.tasks import TaskManager\n"
            "tm = TaskManager()\n"
            "assert {'counterfact_edit', 'zsre_edit'} <= set(tm.all_groups)\n")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("LyapLockLM")


def test_lm_eval_ls_lists_our_tasks():
    proc = _run(["lm_eval", "ls", "groups"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "counterfact_edit" in proc.stdout and "zsre_edit" in proc.stdout


@pytest.mark.smollm
def test_lm_eval_cli_runs_plain_hf_on_counterfact_edit(tmp_path):
    from harness.loading import default_model_path

    gguf = default_model_path()
    proc = _run(["lm_eval", "--model", "hf", "--model_args", f"pretrained={gguf}",
                 "--tasks", "counterfact_edit_scores", "--limit", "3", "--device", "cpu",
                 "--output_path", str(tmp_path)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "efficacy" in proc.stdout and "specificity" in proc.stdout
