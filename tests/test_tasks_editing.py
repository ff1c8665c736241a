"""The counterfact_edit / zsre_edit lm-eval tasks end to end on a tiny Llama model, checked
against a direct torch computation of the reference definitions, and their coupling with the
editing model that is being evaluated."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import harness
from harness import session
from harness.data import load_counterfact, load_zsre
from harness.tasks import edit_metrics as em

TASKS_DIR = harness.tasks_dir()
TRAINING_STEPS = 80


@pytest.fixture(scope="session")
def model_and_tok():
    """A tiny Llama that has memorised two CounterFact edits and two ZsRE answers (one a
    year, whose tokens start with a lone space), so that greedy and success flags vary.
    After the paraphrase of the year question it prefers a new line to the space (2:1 in
    training) but, given the space, continues with the year: lm-eval's is_greedy on a
    continuation that starts with the space would call the "1" wrong, the reference right."""
    from harness.testing import tiny_model

    model, tok = tiny_model("llama")
    cf, zs = load_counterfact(limit=2), load_zsre(limit=3)
    texts = [r.rewrite_prompt + " " + r.target_new for r in (*cf, zs[0], zs[2])]
    year_paraphrase = zs[0].paraphrase_prompts[0]
    texts += [year_paraphrase + " " + zs[0].target_new] + 2 * [year_paraphrase + "\nNo idea"]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAINING_STEPS):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def lm(model_and_tok):
    from lm_eval.models.huggingface import HFLM

    model, tok = model_and_tok
    return HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")


@pytest.fixture(scope="session")
def tok_dir(model_and_tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    model_and_tok[1].save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def no_editor():
    session.clear_editor()
    yield
    session.clear_editor()


def evaluate(lm, task, limit=None, **metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager,
                                   log_samples=True, **evaluate.seed)


evaluate.seed = {}


def direct_mean_nll(model, tok, prefix, target):
    """The reference's test_batch_prediction for one prefix: tokenize f"{prefix} {target}",
    average -log p over the tokens of tok(" " + target)."""
    target_ids = tok(" " + target).input_ids
    ids = tok(f"{prefix} {target}").input_ids
    start = len(tok(prefix).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    nll = -sum(logprobs[start + j - 1, t].item() for j, t in enumerate(target_ids))
    greedy = all(logprobs[start + j - 1].argmax().item() == t for j, t in enumerate(target_ids))
    return nll / len(target_ids), greedy


def direct_token_accuracy(model, tok, prompt, target):
    """The reference's ZsRE check: for token i of tok(" " + target), the argmax after
    prompt + decode(tokens[:i]) must be token i."""
    target_ids = tok(" " + target).input_ids
    flags = []
    for i, t in enumerate(target_ids):
        ids = tok(prompt + tok.decode(target_ids[:i])).input_ids
        with torch.no_grad():
            flags.append(model(torch.tensor([ids])).logits[0, -1].argmax().item() == t)
    return flags


# --------------------------------------------------------------------- counterfact scores


def test_counterfact_scores_match_direct_torch_computation(lm, model_and_tok, tok_dir):
    model, tok = model_and_tok
    out = evaluate(lm, "counterfact_edit_scores", limit=4, tokenizer=tok_dir)
    samples = out["samples"]["counterfact_edit_scores"]
    assert [s["doc"]["case_id"] for s in samples] == [0, 1, 2, 3]
    per_metric = {}
    for sample in samples:
        doc = sample["doc"]
        for metric, comparisons in doc["scores"].items():
            expected_success, expected_margin, expected_acc = [], [], []
            for c in comparisons:
                # each logged prompt with its two candidate scores
                wanted_nll, wanted_greedy = direct_mean_nll(
                    model, tok, c["prompt"], c["wanted"]["continuation"][1:])
                other_nll, _ = direct_mean_nll(model, tok, c["prompt"],
                                               c["other"]["continuation"][1:])
                assert c["wanted"]["mean_nll"] == pytest.approx(wanted_nll, abs=1e-4)
                assert c["other"]["mean_nll"] == pytest.approx(other_nll, abs=1e-4)
                assert c["wanted"]["greedy"] == wanted_greedy
                assert abs(wanted_nll - other_nll) > 1e-4  # no near-tie hides a flipped flag
                expected_success.append(100.0 * (wanted_nll < other_nll))
                expected_margin.append(100 * (math.exp(-wanted_nll) - math.exp(-other_nll)))
                expected_acc.append(100.0 * wanted_greedy)
            assert sample[metric] == statistics.mean(expected_success)
            assert sample[f"{metric}_magnitude"] == pytest.approx(
                statistics.mean(expected_margin), abs=1e-3)
            assert sample[f"{metric}_acc"] == statistics.mean(expected_acc)
            per_metric.setdefault(metric, []).append(sample[metric])
        rewrite = doc["scores"]["efficacy"][0]
        assert rewrite["prompt"] == doc["prompt"].format(doc["subject"])
        assert rewrite["wanted"]["continuation"] == " " + doc["target_new"]
        assert rewrite["other"]["continuation"] == " " + doc["target_true"]
        neighbour = doc["scores"]["specificity"][0]
        assert neighbour["wanted"]["continuation"] == " " + doc["neighborhood_target"]
    # the two memorised edits succeed and are greedy; the flags are not all alike
    assert [(s["efficacy"], s["efficacy_acc"]) for s in samples[:2]] == [(100.0, 100.0)] * 2
    flags = [s[m] for s in samples for m in ("efficacy", "generalization", "specificity")]
    assert 0.0 in flags and 100.0 in flags
    results = out["results"]["counterfact_edit_scores"]
    for metric, values in per_metric.items():
        assert results[f"{metric},none"] == pytest.approx(statistics.mean(values))
        assert results[f"{metric}_stderr,none"] == pytest.approx(
            statistics.stdev(values) / math.sqrt(len(values)))


def test_continuation_count_agrees_with_hflm_split(lm, model_and_tok):
    _, tok = model_and_tok
    for context, continuation in [("The mother tongue of X is", " English"),
                                  ("Toko Yasuda, the", " piano"), ("Paris is in ", "France"),
                                  ("Q?", " Sleater-Kinney")]:
        _, hflm_ids = lm._encode_pair(context, continuation)
        assert em.continuation_token_ids(tok, context, continuation) == hflm_ids


# ------------------------------------------------------------------------------- zsre


def test_zsre_scores_match_direct_argmax(lm, model_and_tok, tok_dir):
    model, tok = model_and_tok
    out = evaluate(lm, "zsre_edit_scores", limit=4, tokenizer=tok_dir)
    samples = out["samples"]["zsre_edit_scores"]
    for sample in samples:
        doc = sample["doc"]
        for metric, prompts in doc["scores"].items():
            flags = []
            for p in prompts:
                direct = direct_token_accuracy(model, tok, p["prompt"], p["target"])
                assert [s["correct"] for s in p["steps"]] == direct
                flags += direct
            assert sample[metric] == pytest.approx(100 * statistics.mean(flags))
    # case 0 ("1998", a lone space then digits) and case 2 were memorised
    assert [s["efficacy"] for s in samples][0] == 100.0 and samples[2]["efficacy"] == 100.0
    assert samples[1]["efficacy"] < 100.0
    # paraphrase of "1998": the lone space is not the argmax, the year after it is
    steps = samples[0]["doc"]["scores"]["generalization"][0]["steps"]
    assert [s["correct"] for s in steps] == [False, True, True, True, True]
    assert samples[0]["generalization"] == 80.0
    # the step after the lone space is read from a one-token greedy generation
    request_kinds = [type(r[0]).__name__ for r in samples[0]["resps"]]
    assert request_kinds.count("str") >= 2  # rewrite and paraphrase of "1998"
    assert samples[0]["doc"]["scores"]["efficacy"][0]["steps"][1]["context"].endswith("? ")


# -------------------------------------------------------------------------- generation


def _texts(out):
    return [g["text"] for s in out["samples"]["counterfact_edit_generation"]
            for g in s["doc"]["scores"]["generations"]]


def test_generation_is_seeded_bounded_and_scored_by_entropy(lm, model_and_tok, tok_dir):
    _, tok = model_and_tok
    first = evaluate(lm, "counterfact_edit_generation", limit=1, tokenizer=tok_dir)
    again = evaluate(lm, "counterfact_edit_generation", limit=1, tokenizer=tok_dir)
    assert _texts(first) == _texts(again)
    evaluate.seed = {"torch_random_seed": 7}
    try:
        other_seed = evaluate(lm, "counterfact_edit_generation", limit=1, tokenizer=tok_dir)
    finally:
        evaluate.seed = {}
    assert _texts(first) != _texts(other_seed)  # really sampled

    for sample in first["samples"]["counterfact_edit_generation"]:
        doc, generations = sample["doc"], sample["doc"]["scores"]["generations"]
        # EasyEdit records have no generation prompts: the rewrite and paraphrase prompts
        assert [g["prompt"] for g in generations] == [
            doc["prompt"].format(doc["subject"]), *doc["paraphrase_prompts"]]
        for g, (_, kwargs) in zip(generations, sample["arguments"]):
            assert kwargs["top_k"] == 5 and kwargs["do_sample"] is True
            # as the reference's generate_fast: each prompt filled to 100 tokens with itself
            assert kwargs["total_tokens"] == 100
            assert g["max_new_tokens"] == 100 - len(tok(g["prompt"]).input_ids)
            assert g["text"].startswith(g["prompt"])
            assert len(tok(g["text"]).input_ids) <= 100 + 2  # re-tokenising may merge/split
        expected = 100 * statistics.mean(em.ngram_entropy(g["text"]) for g in generations)
        assert sample["fluency"] == pytest.approx(expected)
    results = first["results"]["counterfact_edit_generation"]
    assert "fluency,none" in results and "consistency,none" not in results
    notes = first["configs"]["counterfact_edit_generation"]["metadata"]
    assert notes["consistency"].startswith("unavailable")
    assert "rewrite and paraphrase prompts" in notes["generation_prompts"]


def _rome_record(case_id, subject, prompt, new, new_id, true, generation_prompts):
    return {
        "case_id": case_id,
        "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": "P103",
                              "target_new": {"str": new, "id": new_id},
                              "target_true": {"str": true, "id": "Q150"}},
        "paraphrase_prompts": [f"Some words. {subject} speaks"],
        "neighborhood_prompts": ["Michel Rocard speaks"],
        "generation_prompts": generation_prompts,
    }


def test_consistency_with_rome_reference_data(lm, model_and_tok, tok_dir, tmp_path):
    import numpy as np

    records = [
        _rome_record(7, "Danielle Darrieux", "The mother tongue of {} is", "English", "Q1860",
                     "French", ["Danielle Darrieux speaks", "Danielle Darrieux was born in"]),
        _rome_record(9, "Toko Yasuda", "{} speaks", "Japanese", "Q5287", "English",
                     ["Toko Yasuda often says"]),
    ]
    data = tmp_path / "counterfact.json"
    data.write_text(json.dumps(records))
    vocab = {"danielle": 0, "darrieux": 1, "speaks": 2, "english": 3, "born": 4, "toko": 5}
    np.save(tmp_path / "idf.npy", np.array([2.0, 3.0, 1.0, 1.5, 2.5, 4.0]))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "attribute_snippets.json").write_text(json.dumps([
        {"relation_id": "P103", "target_id": "Q1860", "samples": [
            {"name": "A", "text": "Danielle speaks English"}, {"name": "B", "text": "born"}]}]))
    out = evaluate(lm, "counterfact_edit_generation", tokenizer=tok_dir, data_path=str(data),
                   rome_data_dir=str(tmp_path))
    samples = out["samples"]["counterfact_edit_generation"]
    assert [s["doc"]["case_id"] for s in samples] == [7, 9]
    first = samples[0]
    texts = [g["text"] for g in first["doc"]["scores"]["generations"]]
    assert [g["prompt"] for g in first["doc"]["scores"]["generations"]] == records[0][
        "generation_prompts"]
    space = em.TfidfSpace(np.array([2.0, 3.0, 1.0, 1.5, 2.5, 4.0]), vocab)
    expected = 100 * space.cosine(" ".join(texts), "Danielle speaks English born")
    assert first["consistency"] == pytest.approx(expected) and expected > 0
    assert "consistency" not in samples[1]  # no snippets for (P103, Q5287)
    assert out["results"]["counterfact_edit_generation"]["consistency,none"] == pytest.approx(
        expected)
    assert "own generation_prompts" in out["configs"]["counterfact_edit_generation"][
        "metadata"]["generation_prompts"]


# ---------------------------------------------------------------- coupling with editors


class StandInEditor:
    """What the tasks read from an editing lm-eval wrapper (harness.models.EditingLM)."""

    def __init__(self, edited, dataset, edit_data, tokenizer):
        self.edited_requests = edited
        self.edited_dataset = dataset
        self.edit_data = edit_data
        self.tokenizer = tokenizer


def test_editor_requests_are_exactly_the_records_scored(lm, model_and_tok):
    _, tok = model_and_tok
    pool = load_counterfact()
    edited = [pool[i] for i in (37, 5, 120, 64, 3, 99, 250, 11, 404, 8, 77, 301)]
    editor = StandInEditor(edited, "counterfact", "counterfact", tok)
    session.register_editor(editor)
    # no tokenizer in the metadata: the editor's is used
    out = evaluate(lm, "counterfact_edit_scores")
    scored = [s["doc"]["case_id"] for s in out["samples"]["counterfact_edit_scores"]]
    assert scored == [r.case_id for r in edited]
    assert out["n-samples"]["counterfact_edit_scores"]["effective"] == 12
    assert "12 requests edited by StandInEditor" in out["configs"]["counterfact_edit_scores"][
        "metadata"]["edit_records"]


def test_editor_of_another_dataset_is_refused(lm, model_and_tok):
    _, tok = model_and_tok
    editor = StandInEditor(load_counterfact(limit=3), "counterfact", "counterfact", tok)
    session.register_editor(editor)
    with pytest.raises(em.EditDatasetMismatchError,
                       match="zsre_edit scores ZsRE edits but the model edited counterfact; "
                             "use --model_args edit_data=zsre"):
        evaluate(lm, "zsre_edit")


def test_editor_without_edits_scores_its_edit_data(lm, model_and_tok):
    _, tok = model_and_tok
    editor = StandInEditor([], "zsre", "zsre", tok)
    session.register_editor(editor)
    out = evaluate(lm, "zsre_edit_scores", limit=3)
    docs = [s["doc"] for s in out["samples"]["zsre_edit_scores"]]
    expected = load_zsre(limit=3)
    assert [(d["case_id"], d["prompt"]) for d in docs] == [(r.case_id, r.prompt) for r in expected]
    with pytest.raises(em.EditDatasetMismatchError, match="edit_data=counterfact"):
        evaluate(lm, "counterfact_edit_scores", limit=3)


def test_plain_model_scores_data_path_records(lm, tok_dir, tmp_path):
    records = [r.to_dict() for r in load_counterfact()[200:203]]
    rows = [{"case_id": r["case_id"], "prompt": r["prompt"].format(r["subject"]),
             "subject": r["subject"], "target_new": r["target_new"],
             "ground_truth": r["target_true"], "rephrase_prompt": r["paraphrase_prompts"][0],
             "locality_prompt": r["neighborhood_prompts"][0],
             "locality_ground_truth": r["neighborhood_target"]} for r in records][::-1]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = evaluate(lm, "counterfact_edit_scores", tokenizer=tok_dir, data_path=str(path))
    assert [s["doc"]["case_id"] for s in out["samples"]["counterfact_edit_scores"]] == [
        202, 201, 200]


def test_missing_tokenizer_names_the_metadata_fix(lm):
    with pytest.raises(em.TokenizerNotFoundError, match="--metadata '\\{\"tokenizer\""):
        evaluate(lm, "counterfact_edit_scores", limit=1)


def test_tokenizer_from_model_args(model_and_tok, tok_dir):
    from harness.loading import default_model_path

    _, tok = model_and_tok
    gguf = default_model_path()
    text = "The mother tongue of Danielle Darrieux is English"
    from_gguf = em.resolve_tokenizer({"pretrained": str(gguf.parent), "gguf_file": str(gguf)})
    assert from_gguf(text).input_ids == tok(text).input_ids
    assert em.resolve_tokenizer({"pretrained": tok_dir})(text).input_ids == tok(text).input_ids
    editor = StandInEditor([], "counterfact", "counterfact", object())
    session.register_editor(editor)
    assert em.resolve_tokenizer({"pretrained": tok_dir}) is editor.tokenizer


def test_task_files_are_found_by_lm_eval():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    for name in ("counterfact_edit", "counterfact_edit_scores", "counterfact_edit_generation",
                 "zsre_edit", "zsre_edit_scores"):
        assert name in manager.all_tasks
    assert Path(TASKS_DIR, "edit_metrics.py").is_file()
