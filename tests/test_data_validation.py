"""Edit data is validated at load time: every malformed record is an error naming the file, the
line, the field and what was expected, never a crash later (mid-edit, or on resume). The property
tests generate malformed records for every loader and check that each one is either accepted and
round-trips, or rejected with such a message."""

from __future__ import annotations

import gzip
import json
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.data import EditRequest, MalformedRecordError, load_edit_data
from harness.data.edits import MAX_TEXT_CHARS

CF = {"case_id": 7, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
      "ground_truth": "Paris", "rephrase_prompt": "France's capital is", "locality_prompt": "Berlin is in",
      "locality_ground_truth": "Germany"}
ROME = {"case_id": 3, "requested_rewrite": {
    "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "relation_id": "P103",
    "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Danielle Darrieux speaks"], "neighborhood_prompts": ["Léon Blum speaks"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
ZSRE = {"case_id": 0, "src": "Which river does the Rhine flow into?", "subject": "Rhine", "answers": ["North Sea"],
        "alt": "Baltic Sea", "rephrase": "The Rhine flows into which body of water?", "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare"}


def write_lines(path, records, raw_lines=None):
    lines = [json.dumps(r) for r in records]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rejected(path, line, *fragments):
    with pytest.raises(MalformedRecordError) as info:
        load_edit_data(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_line_that_is_not_json_names_file_line_and_column(tmp_path):
    path = write_lines(tmp_path / "cf.jsonl", [CF, {**CF, "case_id": 8}], {1: '{"case_id": 9, "prompt": '})
    rejected(path, 2, "not valid JSON", "column")


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "cf.jsonl"
    good = json.dumps(CF).encode()
    path.write_bytes(good + b"\n" + json.dumps({**CF, "case_id": 8}).encode().replace(b"Rome", b"R\xf6me") + b"\n")
    rejected(path, 2, "not UTF-8", "0xf6")


def test_a_missing_field_names_the_field(tmp_path):
    record = dict(CF)
    del record["ground_truth"]
    path = write_lines(tmp_path / "cf.jsonl", [{**CF, "case_id": 1}, record])
    rejected(path, 2, "missing field 'ground_truth'", "case_id 7")


def test_a_string_where_a_list_belongs_is_not_split_into_characters(tmp_path):
    record = json.loads(json.dumps(ROME))
    record["paraphrase_prompts"] = "Danielle Darrieux speaks"
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{**ROME, "case_id": 1}, record], indent=2))
    # the second record of the array starts further down the file: its own line is named
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]
    assert len(starts) == 2 and starts[1] > 10
    second = starts[1]
    rejected(path, second, "'paraphrase_prompts' must be a list of strings, got a string")


@pytest.mark.parametrize("value", [["a", "b"], 42, None, "text"], ids=["list", "number", "null", "string"])
def test_a_zsre_record_that_is_not_an_object(value, tmp_path):
    path = write_lines(tmp_path / "zsre.jsonl", [ZSRE, value])
    if value is None:  # "null" is a JSON value too: the record is not an object
        path.write_text(json.dumps(ZSRE) + "\nnull\n")
    rejected(path, 2, "zsre record 1", "a record must be a JSON object")


def test_an_overlong_prompt_is_refused_before_it_is_tokenised(tmp_path):
    record = {**CF, "prompt": "The capital of France is" + " very" * MAX_TEXT_CHARS}
    path = write_lines(tmp_path / "cf.jsonl", [record])
    rejected(path, 1, "field 'prompt' is", f"at most {MAX_TEXT_CHARS} are accepted")


@pytest.mark.parametrize("prompt", ["The {x} of France is", "The capital of France } is", "France {} is {}"])
def test_braces_that_are_not_the_subject_placeholder(prompt, tmp_path):
    path = write_lines(tmp_path / "cf.jsonl", [{**CF, "prompt": prompt}])
    rejected(path, 1, "prompt")


def test_a_rome_template_with_a_stray_brace(tmp_path):
    record = json.loads(json.dumps(ROME))
    record["requested_rewrite"]["prompt"] = "The {mother} tongue of {} is"
    path = write_lines(tmp_path / "cf.jsonl", [record])
    rejected(path, 1, "requested_rewrite.prompt", "not the subject placeholder")


def test_duplicate_case_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "cf.jsonl", [CF, {**CF, "case_id": 8}, {**CF, "case_id": 7}])
    rejected(path, 3, f"repeats case_id 7 of {path}:1")


def test_a_gzip_file_that_is_cut_short(tmp_path):
    path = tmp_path / "cf.jsonl.gz"
    data = gzip.compress((json.dumps(CF) + "\n").encode() * 50)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MalformedRecordError, match=re.escape(str(path)) + ": cannot be read"):
        load_edit_data(str(path))


def test_a_prompt_longer_than_the_models_context_names_its_line(tmp_path, monkeypatch):
    """The tiny Llama takes 256 positions: a 1,800-character prompt fits the load-time bound but
    not the model. Before, it was accepted and silently truncated or failed mid-edit."""
    from harness.models import MEMITLM
    from harness.testing import tiny_model

    model, tok = tiny_model("llama")
    long_prompt = "The capital of France is " + "truly " * 300
    path = write_lines(tmp_path / "cf.jsonl", [CF, {**CF, "case_id": 8, "locality_prompt": long_prompt}])
    with pytest.raises(MalformedRecordError) as info:
        MEMITLM(pretrained=model, tokenizer=tok, edit_data=str(path), num_edits=2, hparams="smollm2-135m",
                layers=[1], progress=False, device="cpu")
    message = str(info.value)
    assert message.startswith(f"{path}:2: neighborhood_prompts[0] is "), message
    assert f"takes {model.config.max_position_embeddings} tokens" in message


# ------------------------------------------------------------------------------------ properties

TEXT = st.text(alphabet=string.ascii_letters + " {}é\u2028\x00", min_size=0, max_size=12)
VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), TEXT,
                  st.lists(TEXT, max_size=2), st.dictionaries(TEXT, TEXT, max_size=2))


def mutated(base: dict):
    """A valid record with fields removed, replaced by any JSON value, or added."""
    keys = sorted(base)
    return st.tuples(
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.sampled_from(keys + ["extra"]), VALUE, max_size=3),
    ).map(lambda change: {**{k: v for k, v in base.items() if k not in change[0]}, **change[1]})


# valid records too (several in one file repeat a case_id: rejected), and nested ROME fields
RECORDS = st.one_of(st.sampled_from([CF, ZSRE, ROME]), mutated(CF), mutated(ZSRE), mutated(ROME),
                    mutated(ROME["requested_rewrite"]).map(lambda rw: {**ROME, "requested_rewrite": rw}), VALUE)


def check_loaded_or_rejected(path, records):
    """Either every record round-trips, or the error names this file and a line of it."""
    try:
        requests = load_edit_data(str(path))
    except MalformedRecordError as exc:
        match = re.match(rf"{re.escape(str(path))}(?::(\d+))?: ", str(exc))
        assert match, str(exc)
        if match.group(1):
            assert 1 <= int(match.group(1)) <= len(path.read_text(encoding="utf-8").split("\n"))
        return None
    assert len(requests) == len(records)
    for request in requests:
        assert EditRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
        assert request.prompt.count("{}") == 1
        request.rewrite_prompt  # noqa: B018 - formats without error
        assert all(isinstance(t, str) for t in request.texts().values())
    assert len({r.case_id for r in requests}) == len(requests)
    return requests


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(RECORDS, min_size=1, max_size=4), as_array=st.booleans())
def test_any_record_is_loaded_and_round_trips_or_rejected_with_file_and_line(records, as_array, tmp_path):
    path = tmp_path / ("data.json" if as_array else "data.jsonl")
    if as_array:
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    check_loaded_or_rejected(path, records)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.binary(min_size=1, max_size=40), at=st.integers(0, 3))
def test_any_bytes_in_a_jsonl_file_are_loaded_or_rejected_with_file_and_line(noise, at, tmp_path):
    lines = [json.dumps({**CF, "case_id": i}).encode() for i in range(3)]
    lines.insert(at, noise)
    path = tmp_path / "noisy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        check_loaded_or_rejected(path, [None] * 3)
    except UnicodeDecodeError:  # the check reads the file as text; the loader itself must not raise it
        with pytest.raises(MalformedRecordError, match=rf"{re.escape(str(path))}:\d+: not UTF-8"):
            load_edit_data(str(path))
