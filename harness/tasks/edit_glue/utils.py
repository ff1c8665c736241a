"""edit_glue: the GLUE-style general-capability probe reported by AlphaEdit and LyapLock.

Definitions follow the reference ``glue_eval/`` code of those papers (read, not copied):

* Data: the AlphaEdit subsets (``sst2``, ``mrpc``, ``cola``, ``rte``, ``nli``, ``mmlu``). The
  first 10 records of a file are the few-shot pool, the next ``glue_number_of_tests`` (100)
  are scored, zero-shot unless ``--num_fewshot`` asks for up to 10 of the pool, in order.
* Two predictions per item.
  - generation: 5 greedy new tokens; the text after the last ``answer_after`` marker is
    searched, lower-cased, for the ``answer_keywords`` in order (substring match, first hit
    wins); no hit is the invalid class -1.
  - likelihood: each answer word (``doc_to_choice``, index = class) is appended to the prompt
    after ``target_delimiter`` and scored by its mean log-probability per token; the class
    with the strictly highest score wins, a tie gives ``likelihood_tie`` (0 for the binary
    tasks, as the reference's ``1 if p1 > p0 else 0``; -1 for MMLU).
* Metrics (corpus level, so the per-item result is a ``(gold, prediction)`` pair):
  ``f1_generate`` (reference ``f1``) and ``f1_likelihood`` (reference ``f1_new``) are
  sklearn's weighted F1, where -1 is a class of its own that is never right;
  ``mcc_generate`` (reference ``mcc``); plus ``acc_generate``, ``acc_likelihood`` and
  ``invalid_generate`` (the share of -1 predictions).

Where this differs from the reference:
* The reference trims few-shot examples to a context budget looked up by model name; here the
  requested number of examples is always used.
* Token counts of the answer words come from a tokenizer found at scoring time: the
  ``tokenizer`` metadata / model argument, else the active editing wrapper's tokenizer, else
  ``pretrained`` (+ ``gguf_file``) from the model arguments. Without one, the summed
  log-probability is used, which equals the per-token mean when every answer word is a
  single token (true of the GPT-2, Llama and SmolLM2 vocabularies for these words).
* lm-eval scores the continuation as it tokenizes ``prompt + " " + word``: after a prompt that
  ends in a space (CoLA's ``"Answer: "``) the extra space token is scored too, equally for
  every answer word.
* Like the reference, RTE scores GLUE label 1 (``not_entailment``) as "True"; the label map in
  ``edit_glue_rte.yaml`` keeps that convention so numbers stay comparable.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from harness.data.general import bundled, read_jsonl, splits

log = logging.getLogger("harness.tasks.edit_glue")

FEWSHOT_POOL_SIZE = 10
DEFAULT_NUMBER_OF_TESTS = 100
GLUE_DIR_ENV = "SEQEDIT_GLUE_DATA_DIR"
BUNDLED_GLUE_DIR = bundled("glue_eval")
INVALID = -1


# ----------------------------------------------------------------------------- data


def resolve_glue_dir(directory: str | os.PathLike | None = None) -> Path:
    """The metadata value, else ``$SEQEDIT_GLUE_DATA_DIR``, else the bundled 110-record subsets."""
    chosen = directory or os.environ.get(GLUE_DIR_ENV)
    return Path(chosen).expanduser() if chosen else BUNDLED_GLUE_DIR


def gold_label(record: dict, label_field: str, label_map: dict | None) -> int:
    value = record[label_field]
    if label_map is None:
        return int(value)
    try:
        return int(label_map[str(value)])
    except KeyError:
        raise ValueError(
            f"label {value!r} of record {record} is not in the task's label_map {label_map}"
        ) from None


def load_glue_subset(
    subset: str,
    label_field: str = "label",
    label_map: dict | None = None,
    glue_data_dir: str | None = None,
    glue_number_of_tests: int | str | None = DEFAULT_NUMBER_OF_TESTS,
    **_ignored,
):
    """lm-eval ``custom_dataset``: split ``fewshot`` (first 10 records) and ``test`` (the next N).

    ``glue_number_of_tests``: how many records after the few-shot pool are scored (100 as in
    the papers); ``"all"`` or null for every remaining record.
    """
    path = resolve_glue_dir(glue_data_dir) / f"{subset}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"edit_glue: {path} does not exist; glue_data_dir (or ${GLUE_DIR_ENV}) must be a "
            f"directory holding the AlphaEdit glue_eval subsets as {subset}.jsonl"
        )
    records = read_jsonl(path)
    available = len(records) - FEWSHOT_POOL_SIZE
    if glue_number_of_tests in (None, "all"):
        n_tests = available
    else:
        n_tests = int(glue_number_of_tests)
        if not 0 < n_tests <= available:
            raise ValueError(
                f"edit_glue: {path} holds {available} test records after the {FEWSHOT_POOL_SIZE} "
                f"few-shot ones, {n_tests} were asked for; point glue_data_dir at the full subsets "
                f"or lower glue_number_of_tests"
            )
    docs = [{**r, "gold": gold_label(r, label_field, label_map)} for r in records]
    return splits(
        fewshot=docs[:FEWSHOT_POOL_SIZE],
        test=docs[FEWSHOT_POOL_SIZE:FEWSHOT_POOL_SIZE + n_tests],
    )


# ----------------------------------------------------------------------------- predictions


def parse_generation(text: str, answer_keywords, answer_after: str | None = None) -> int:
    """Class of the first keyword found (lower-cased substring) after the last marker, else -1."""
    if answer_after:
        text = text.split(answer_after)[-1]
    lowered = text.lower()
    for keyword, label in answer_keywords:
        if keyword.lower() in lowered:
            return int(label)
    return INVALID


def likelihood_prediction(logprob_sums, token_counts, tie: int) -> int:
    """Class whose answer has the strictly highest mean log-probability per token, else ``tie``."""
    scores = [lp / n for lp, n in zip(logprob_sums, token_counts)]
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return winners[0] if len(winners) == 1 else tie


# ----------------------------------------------------------------------------- aggregations


def _unzip(items):
    golds, preds = zip(*items)
    return list(golds), list(preds)


def weighted_f1(items) -> float:
    from sklearn.metrics import f1_score

    golds, preds = _unzip(items)
    return float(f1_score(golds, preds, average="weighted", zero_division=0))


def matthews_correlation(items) -> float:
    from sklearn.metrics import matthews_corrcoef

    golds, preds = _unzip(items)
    return float(matthews_corrcoef(golds, preds))


# ----------------------------------------------------------------------------- token counts


@lru_cache(maxsize=8)
def _load_tokenizer(name: str, gguf_file: str | None):
    from harness.loading import load_tokenizer

    return load_tokenizer(name, gguf_file=gguf_file)


def answer_tokenizer(metadata: dict):
    """The evaluated model's tokenizer as far as a task can know it (see the module docstring)."""
    from harness.session import active_editor

    name = metadata.get("tokenizer")
    if not name:
        editor = active_editor()
        if getattr(editor, "tokenizer", None) is not None:
            return editor.tokenizer
        name = metadata.get("pretrained")
    if isinstance(name, str) and name:
        try:
            return _load_tokenizer(name, metadata.get("gguf_file"))
        except Exception as exc:  # offline hub id, unreadable path: fall back, loudly
            log.warning("edit_glue: could not load tokenizer %r (%s)", name, exc)
    return None


def answer_token_counts(answers: list[str], tokenizer) -> list[int]:
    return [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers]


# ----------------------------------------------------------------------------- task


class EditGlueTask(ConfigurableTask):
    """A YAML-configured task that asks for a generation and the answers' likelihoods per item.

    lm-eval's output types give one kind of request per task, hence this class (the pattern of
    lm-eval's own SQuAD v2 task); prompts, answers and parsing rules stay in the YAML files.
    """

    def __init__(self, config: dict | None = None) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        # a process_results in the config makes lm-eval take metric names as given
        # instead of looking them up in its metric registry
        config["process_results"] = self.process_results
        super().__init__(config=config)
        self._token_counts: list[int] | None = None

    @property
    def _metadata(self) -> dict:
        return self.config.metadata or {}

    def answers(self, doc: dict) -> list[str]:
        return [f"{self.config.target_delimiter}{c}" for c in self.doc_to_choice(doc)]

    def construct_requests(self, doc: dict, ctx: str, **kwargs) -> list[Instance]:
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        generation = Instance(
            request_type="generate_until",
            doc=doc,
            arguments=(ctx, dict(self.config.generation_kwargs)),
            idx=0,
            **kwargs,
        )
        likelihoods = [
            Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, answer), idx=i + 1,
                     **kwargs)
            for i, answer in enumerate(self.answers(doc))
        ]
        return [generation, *likelihoods]

    def token_counts(self, doc: dict) -> list[int]:
        if self._token_counts is None:
            answers = self.answers(doc)
            tokenizer = answer_tokenizer(self._metadata)
            if tokenizer is None:
                log.warning(
                    "%s: no tokenizer known, so answers are scored by summed log-probability "
                    "(the per-token mean when each answer is one token); pass "
                    "--metadata '{\"tokenizer\": \"<name or path>\"}' to normalise",
                    self.config.task,
                )
                self._token_counts = [1] * len(answers)
            else:
                self._token_counts = answer_token_counts(answers, tokenizer)
        return self._token_counts

    def process_results(self, doc: dict, results: list) -> dict:
        if self.config.process_results != self.process_results:
            # lm-eval swapped our metrics out (--predict_only): its generic path scores "bypass"
            return super().process_results(doc, results)
        generated, *scored = results
        meta = self._metadata
        gold = int(doc["gold"])
        by_generation = parse_generation(
            generated, meta["answer_keywords"], meta.get("answer_after")
        )
        by_likelihood = likelihood_prediction(
            [logprob for logprob, _ in scored], self.token_counts(doc), int(meta["likelihood_tie"])
        )
        return {
            "f1_generate": (gold, by_generation),
            "f1_likelihood": (gold, by_likelihood),
            "mcc_generate": (gold, by_generation),
            "acc_generate": float(by_generation == gold),
            "acc_likelihood": float(by_likelihood == gold),
            "invalid_generate": float(by_generation == INVALID),
        }
