"""General-capability tasks: edit_glue (AlphaEdit/LyapLock protocol), gsm8k_edit, humaneval_edit,
mbpp_edit. Prompts are checked against the reference format strings, metrics against
hand-worked values, scoring end to end through lm_eval.simple_evaluate."""

from __future__ import annotations

import json
import math

import pytest
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from sklearn.metrics import f1_score, matthews_corrcoef

from harness import tasks_dir
from harness.data.general import bundled, read_jsonl
from harness.tasks.edit_glue import utils as glue

GLUE_SUBTASKS = ["sst2", "mrpc", "cola", "rte", "nli", "mmlu"]
GLUE_METRICS = ["f1_generate", "f1_likelihood", "mcc_generate", "acc_generate",
                "acc_likelihood", "invalid_generate"]


@pytest.fixture(scope="session")
def task_manager():
    # our directory only: indexing all of lm-eval's tasks takes far longer
    return TaskManager(include_path=tasks_dir(), include_defaults=False)


@pytest.fixture(scope="session")
def glue_tasks(task_manager):
    tasks = task_manager.load(["edit_glue"])["tasks"]
    return {name.removeprefix("edit_glue_"): task for name, task in tasks.items()}


def raw_records(subset):
    return read_jsonl(bundled(f"glue_eval/{subset}.jsonl"))


# ----------------------------------------------------------------------------- data and split


def test_our_task_names_do_not_shadow_lm_evals_own(task_manager):
    ours = set(task_manager.all_tasks) | set(task_manager.all_groups)
    expected = {"edit_glue", "gsm8k_edit", "humaneval_edit", "mbpp_edit"} | {
        f"edit_glue_{s}" for s in GLUE_SUBTASKS
    }
    assert expected <= ours
    assert not ours & {"gsm8k", "mmlu", "humaneval", "mbpp", "glue", "sst2", "mrpc", "cola", "rte"}


@pytest.mark.parametrize("subset", GLUE_SUBTASKS)
def test_first_ten_records_are_the_fewshot_pool_and_the_next_hundred_are_scored(subset):
    records = raw_records(subset)
    assert len(records) == 110  # what ships: exactly what the default needs
    data = glue.load_glue_subset(subset, label_field="answer" if subset == "mmlu" else "label",
                                 label_map=({"entailment": 1, "not_entailment": 0}
                                            if subset == "nli" else None))
    assert data["fewshot"].num_rows == 10 and data["test"].num_rows == 100
    key = "question" if subset == "mmlu" else ("sentence1" if "sentence1" in records[0] else "sentence")
    assert data["fewshot"][key] == [r[key] for r in records[:10]]
    assert data["test"][key] == [r[key] for r in records[10:110]]


def test_scored_items_of_each_task_are_records_10_to_109(glue_tasks):
    for subset, task in glue_tasks.items():
        key = "question" if subset == "mmlu" else ("sentence1" if subset in ("mrpc", "rte", "nli")
                                                    else "sentence")
        docs = list(task.test_docs())
        assert [d[key] for d in docs] == [r[key] for r in raw_records(subset)[10:110]], subset


def test_gold_labels_follow_the_reference_convention():
    nli = glue.load_glue_subset("nli", label_map={"entailment": 1, "not_entailment": 0})["test"]
    assert all(d["gold"] == (1 if d["label"] == "entailment" else 0) for d in nli)
    mmlu = glue.load_glue_subset("mmlu", label_field="answer")["test"]
    assert mmlu["gold"] == mmlu["answer"]
    rte = glue.load_glue_subset("rte")["test"]  # label 1 is scored as "True", as in the reference
    assert rte["gold"] == rte["label"]
    with pytest.raises(ValueError, match="label_map"):
        glue.gold_label({"label": "neutral"}, "label", {"entailment": 1})


def test_a_full_data_directory_and_the_number_of_tests_are_configurable(tmp_path, monkeypatch):
    records = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(125)]
    (tmp_path / "sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    full = glue.load_glue_subset("sst2", glue_data_dir=str(tmp_path), glue_number_of_tests="all")
    assert full["test"]["sentence"] == [f"s{i}" for i in range(10, 125)]
    assert glue.load_glue_subset("sst2", glue_data_dir=str(tmp_path))["test"].num_rows == 100
    monkeypatch.setenv(glue.GLUE_DIR_ENV, str(tmp_path))
    assert glue.load_glue_subset("sst2", glue_number_of_tests=115)["test"]["sentence"][-1] == "s124"
    with pytest.raises(ValueError, match="holds 115 test records"):
        glue.load_glue_subset("sst2", glue_number_of_tests=116)
    with pytest.raises(FileNotFoundError, match="mrpc.jsonl"):
        glue.load_glue_subset("mrpc")
    monkeypatch.delenv(glue.GLUE_DIR_ENV)
    with pytest.raises(ValueError, match="point glue_data_dir at the full subsets"):
        glue.load_glue_subset("sst2", glue_number_of_tests=101)


# ----------------------------------------------------------------------------- prompts


def reference_question(subset, r):
    """The zero-shot prompts of the reference glue_eval code, written out by hand."""
    if subset == "sst2":
        return "Review :" + r["sentence"] + "\nSentiment :"
    if subset == "mrpc":
        return ("Are the sentences paraphrases of each other.\n"
                f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nAnswer:")
    if subset == "cola":
        return f"Is this sentence linguistically acceptable?\nSentence: {r['sentence']}\nAnswer: "
    if subset == "rte":
        return f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\nanswer:"
    if subset == "nli":
        return f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer:"
    options = "".join(f"({letter}) {c}\n" for letter, c in zip("ABCD", r["choices"]))
    return f"Question: {r['question']}\n{options}Answer:"


def reference_example(subset, r):
    """The reference's few-shot examples (note SST-2's extra space and CoLA's answer)."""
    if subset == "sst2":
        return f"Review : {r['sentence']}\nSentiment : {'positive' if r['label'] == 1 else 'negative'}\n"
    if subset == "mrpc":
        return (f"Are the sentences paraphrases of each other.\nSentence 1: {r['sentence1']}\n"
                f"Sentence 2: {r['sentence2']}\nAnswer: {'No' if r['label'] == 0 else 'Yes'}\n")
    if subset == "cola":
        return (f"Is this sentence linguistically acceptable?\nSentence: {r['sentence']}\n"
                f"Answer: {'No' if r['label'] == 0 else 'Yes'}\n")
    if subset == "rte":
        return (f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\n"
                f"answer: {'False' if r['label'] == 0 else 'True'}\n")
    if subset == "nli":
        return (f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer: "
                f"{'True' if r['label'] == 'entailment' else 'False'}\n")
    return reference_question(subset, r) + " " + "ABCD"[r["answer"]] + "\n"


REFERENCE_ANSWERS = {  # the words the reference scores by likelihood, by class
    "sst2": [" negative", " positive"], "mrpc": [" No", " Yes"], "cola": [" No", " Yes"],
    "rte": [" False", " True"], "nli": [" False", " True"], "mmlu": [" A", " B", " C", " D"],
}


@pytest.mark.parametrize("subset", GLUE_SUBTASKS)
def test_zero_shot_prompts_and_requests_match_the_reference(glue_tasks, subset):
    task = glue_tasks[subset]
    records = raw_records(subset)
    for doc, record in zip(list(task.test_docs())[:3], records[10:13]):
        ctx = task.fewshot_context(doc, num_fewshot=0)
        assert ctx == reference_question(subset, record)
        generation, *likelihoods = task.construct_requests(doc, ctx, metadata=("t", 0, 1))
        assert generation.request_type == "generate_until"
        assert generation.args == (ctx, {"until": [], "max_gen_toks": 5, "do_sample": False})
        assert [i.request_type for i in likelihoods] == ["loglikelihood"] * len(likelihoods)
        assert [i.args for i in likelihoods] == [(ctx, a) for a in REFERENCE_ANSWERS[subset]]


@pytest.mark.parametrize("subset", GLUE_SUBTASKS)
def test_few_shot_prompts_match_the_reference(glue_tasks, subset):
    task = glue_tasks[subset]
    records = raw_records(subset)
    doc = task.test_docs()[0]
    expected = "".join(reference_example(subset, r) for r in records[:3])
    expected += reference_question(subset, records[10])
    assert task.fewshot_context(doc, num_fewshot=3) == expected


# ----------------------------------------------------------------------------- predictions


@pytest.mark.parametrize(
    "subset, generated, expected",
    [
        ("sst2", " positive\nReview", 1),
        ("sst2", " Negative.", 0),
        ("sst2", " it was fine", -1),
        ("sst2", " positive\nSentiment : negative", 0),  # text after the last marker counts
        ("mrpc", " Yes, they are", 1),
        ("mrpc", " No.", 0),
        ("mrpc", " not sure", 0),  # substring search, as in the reference
        ("mrpc", " yes and no", 1),  # "yes" is looked for first
        ("mrpc", " maybe", -1),
        ("cola", "Yes", 1),
        ("cola", " acceptable", -1),
        ("rte", " True", 1),
        ("rte", " true or false", 0),  # RTE looks for "false" first
        ("nli", " true or false", 1),  # NLI looks for "true" first
        ("nli", " False", 0),
        ("mmlu", " B\n\nQuestion", 1),
        ("mmlu", " B", -1),  # a letter counts only when a newline follows
        ("mmlu", " (A)\n", -1),
        ("mmlu", " the data\n", 0),  # the reference's pattern also hits word endings
    ],
)
def test_generation_is_parsed_like_the_reference(glue_tasks, subset, generated, expected):
    meta = glue_tasks[subset].config.metadata
    assert glue.parse_generation(generated, meta["answer_keywords"], meta.get("answer_after")) \
        == expected


def test_likelihood_prediction_uses_the_mean_per_token_and_a_strict_maximum():
    assert glue.likelihood_prediction([-1.0, -2.0], [1, 1], tie=0) == 0
    assert glue.likelihood_prediction([-3.0, -2.0], [1, 1], tie=0) == 1
    assert glue.likelihood_prediction([-2.0, -2.0], [1, 1], tie=0) == 0  # "1 if p1 > p0 else 0"
    # per-token means: -2.0 vs -1.5, so the two-token answer wins although its sum is lower
    assert glue.likelihood_prediction([-2.0, -3.0], [1, 2], tie=0) == 1
    assert glue.likelihood_prediction([-1.0, -1.0, -2.0, -3.0], [1, 1, 1, 1], tie=-1) == -1
    assert glue.likelihood_prediction([-4.0, -1.0, -2.0, -3.0], [1, 1, 1, 1], tie=-1) == 1


def test_answer_token_counts_come_from_the_tokenizer():
    from harness.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    assert glue.answer_token_counts(REFERENCE_ANSWERS["sst2"], tok) == [1, 1]
    long_word = " antidisestablishmentarianism"
    assert glue.answer_token_counts([long_word], tok) == [len(tok(long_word).input_ids)]
    assert glue.answer_token_counts([long_word], tok)[0] > 1
    loaded = glue.answer_tokenizer({"tokenizer": tok.name_or_path})
    assert loaded("Yes").input_ids == tok("Yes").input_ids


# ----------------------------------------------------------------------------- metrics


def test_weighted_f1_counts_invalid_as_a_wrong_class():
    items = [(1, 1), (1, -1), (0, 0), (0, 1)]
    # class 1: P = R = 1/2, F1 = 1/2; class 0: P = 1, R = 1/2, F1 = 2/3; -1 has no support
    assert glue.weighted_f1(items) == pytest.approx((2 * 0.5 + 2 * 2 / 3) / 4)
    assert glue.weighted_f1(items) == pytest.approx(
        f1_score([1, 1, 0, 0], [1, -1, 0, 1], average="weighted"))
    assert glue.weighted_f1([(1, 1), (0, 0)]) == 1.0
    assert glue.weighted_f1([(1, -1), (0, -1)]) == 0.0


def test_mcc_matches_the_hand_worked_value():
    items = [(1, 1), (1, 0), (0, 0), (0, 0)]  # TP 1, FN 1, TN 2, FP 0
    assert glue.matthews_correlation(items) == pytest.approx(2 / math.sqrt(1 * 2 * 2 * 3))
    invalid = [(1, 1), (1, -1), (0, 0), (0, 1), (0, -1)]
    assert glue.matthews_correlation(invalid) == pytest.approx(
        matthews_corrcoef([1, 1, 0, 0, 0], [1, -1, 0, 1, -1]))


def test_process_results_returns_gold_prediction_pairs(glue_tasks):
    task = glue_tasks["mrpc"]
    doc = task.test_docs()[0]
    gold = doc["gold"]
    # generation says the opposite of gold; the likelihood prefers the gold answer
    wrong_word = " Yes" if gold == 0 else " No"
    lls = [(-1.0, True), (-5.0, False)] if gold == 0 else [(-5.0, False), (-1.0, True)]
    result = task.process_results(doc, [wrong_word, *lls])
    assert result == {
        "f1_generate": (gold, 1 - gold), "f1_likelihood": (gold, gold),
        "mcc_generate": (gold, 1 - gold), "acc_generate": 0.0, "acc_likelihood": 1.0,
        "invalid_generate": 0.0,
    }
    assert task.process_results(doc, [" hmm", *lls])["f1_generate"] == (gold, -1)


# ----------------------------------------------------------------------------- end to end


def test_tiny_model_runs_edit_glue_through_simple_evaluate():
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    from harness.testing import tiny_model

    model, tok = tiny_model("llama")
    manager = TaskManager(include_path=tasks_dir(), include_defaults=False,
                          metadata={"tokenizer": tok.name_or_path})
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=16), tasks=["edit_glue"],
        limit=5, task_manager=manager, log_samples=True, bootstrap_iters=0,
    )
    print(make_table(results))
    for subset in GLUE_SUBTASKS:
        task_name = f"edit_glue_{subset}"
        scores = results["results"][task_name]
        for metric in GLUE_METRICS:
            print(task_name, metric, scores[f"{metric},none"])
        samples = results["samples"][task_name]
        assert len(samples) == 5
        meta = results["configs"][task_name]["metadata"]
        golds, by_generation = [], []
        for sample in samples:
            generated, *scored = sample["filtered_resps"]
            assert [args[1] for args in sample["arguments"][1:]] == REFERENCE_ANSWERS[subset]
            assert generated == sample["resps"][0][0]
            golds.append(sample["doc"]["gold"])
            by_generation.append(glue.parse_generation(generated, meta["answer_keywords"],
                                                       meta.get("answer_after")))
        # the corpus-level numbers are those of the logged predictions
        assert scores["f1_generate,none"] == pytest.approx(
            f1_score(golds, by_generation, average="weighted", zero_division=0))
        assert scores["mcc_generate,none"] == pytest.approx(matthews_corrcoef(golds, by_generation))
        assert scores["invalid_generate,none"] == pytest.approx(by_generation.count(-1) / 5)
        assert 0.0 <= scores["f1_likelihood,none"] <= 1.0
    group = results["results"]["edit_glue"]
    for metric in GLUE_METRICS:
        mean = sum(results["results"][f"edit_glue_{s}"][f"{metric},none"] for s in GLUE_SUBTASKS)
        assert group[f"{metric},none"] == pytest.approx(mean / len(GLUE_SUBTASKS))


def test_predict_only_logs_both_predictions_without_scoring(task_manager):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from harness.testing import tiny_model

    model, tok = tiny_model("llama")
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok), tasks=["edit_glue_sst2"], limit=2,
        task_manager=task_manager, predict_only=True,
    )
    assert "bypass,none" in results["results"]["edit_glue_sst2"]
    generated, *scored = results["samples"]["edit_glue_sst2"][0]["filtered_resps"]
    assert isinstance(generated, str) and len(scored) == 2


class CannedLM(LM):
    """Answers every generation request with ``answer(doc)``; remembers the requests."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.requests = []

    def generate_until(self, requests):
        self.requests += requests
        return [self.answer(r.doc) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def evaluate(task_manager, lm, task, **kwargs):
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager,
                                      bootstrap_iters=0, **kwargs)
    return results["results"][task]


def test_gsm8k_edit_scores_the_final_number(task_manager):
    problems = read_jsonl(bundled("gsm8k/test_first50.jsonl"))[:4]
    finals = [p["answer"].split("####")[-1].strip() for p in problems]
    canned = {
        problems[0]["question"]: f"Some steps.\n#### {finals[0]}",  # both extractions right
        problems[1]["question"]: f"So the answer is {finals[1]}.",  # only the last number
        problems[2]["question"]: f"#### {finals[2]}\nor maybe 99999",  # only the #### number
        problems[3]["question"]: "#### 99999",  # wrong
    }
    lm = CannedLM(lambda doc: canned[doc["question"]])
    scores = evaluate(task_manager, lm, "gsm8k_edit", limit=4)
    assert scores["exact_match,strict-match"] == pytest.approx(2 / 4)
    assert scores["exact_match,flexible-extract"] == pytest.approx(2 / 4)
    assert lm.requests[0].args[0] == f"Question: {problems[0]['question']}\nAnswer:"


def test_gsm8k_edit_few_shot_uses_worked_solutions_from_the_pool(task_manager):
    pool = read_jsonl(bundled("gsm8k/fewshot_pool_last8.jsonl"))
    lm = CannedLM(lambda doc: "#### 0")
    evaluate(task_manager, lm, "gsm8k_edit", limit=1, num_fewshot=2)
    context = lm.requests[0].args[0]
    assert context.startswith(f"Question: {pool[0]['question']}\nAnswer: {pool[0]['answer']}\n\n"
                              f"Question: {pool[1]['question']}\nAnswer: {pool[1]['answer']}\n\n")


def test_humaneval_edit_passes_canonical_solutions_only(task_manager):
    passing = {"HumanEval/0", "HumanEval/2"}
    lm = CannedLM(lambda doc: doc["canonical_solution"] if doc["task_id"] in passing
                  else "    return None\n")
    scores = evaluate(task_manager, lm, "humaneval_edit", limit=4, confirm_run_unsafe_code=True)
    assert scores["pass@1,none"] == pytest.approx(2 / 4)
    assert lm.requests[0].args[0] == read_jsonl(bundled("humaneval/HumanEval_first20.jsonl"))[0]["prompt"]


def test_code_tasks_refuse_to_run_without_confirmation(task_manager):
    for task in ("humaneval_edit", "mbpp_edit"):
        with pytest.raises(ValueError, match="unsafe"):
            evaluate(task_manager, CannedLM(lambda doc: ""), task, limit=1)


def test_mbpp_edit_scores_reference_code_and_extracts_fenced_code(task_manager):
    def answer(doc):
        if doc["task_id"] == 11:
            return doc["code"]
        if doc["task_id"] == 12:
            return f"Here you go:\n```python\n{doc['code']}\n```\n"
        return "def unrelated():\n    return 0\n"

    lm = CannedLM(answer)
    scores = evaluate(task_manager, lm, "mbpp_edit", limit=4, confirm_run_unsafe_code=True)
    assert scores["pass@1,none"] == pytest.approx(2 / 4)
    # 3-shot with task ids 2, 3, 4, in the MBPP paper's format
    prompt = lm.requests[0].args[0]
    shots = read_jsonl(bundled("mbpp/prompt_2-4.jsonl"))
    first = shots[0]
    assert prompt.startswith(
        f"You are an expert Python programmer, and here is your task: {first['text']} "
        "Your code should pass these tests:\n\n" + "\n".join(first["test_list"]) + "\n[BEGIN]\n"
        + first["code"].replace("\r\n", "\n") + "\n[DONE]\n\n")
    assert prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
