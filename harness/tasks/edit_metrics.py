"""Knowledge-editing metrics, and the lm-eval plumbing shared by ``counterfact_edit`` and
``zsre_edit``.

The definitions follow the evaluation code that ROME, MEMIT, AlphaEdit and LyapLock share
(``experiments/py/eval_utils_counterfact.py``, ``eval_utils_zsre.py``, ``summarize.py``):

* CounterFact efficacy / generalization / specificity compare the mean per-token NLL of two
  candidate objects after a prompt; ``*_magnitude`` is the probability margin
  exp(-NLL_wanted) - exp(-NLL_other); ``*_acc`` asks that every token of the wanted object be
  the argmax under teacher forcing.
* ZsRE efficacy / generalization / specificity are token-level top-1 accuracies under teacher
  forcing.
* Fluency is the weighted 2-/3-gram entropy of sampled text; consistency the TF-IDF cosine
  between the generated text and Wikipedia snippets about other subjects with the new object.

Every per-record value is multiplied by 100, as in the papers' tables, so that lm-eval's mean
and ``mean_stderr`` come out in the reported units. The scoring itself is lm-eval's: a summed
log-likelihood and ``is_greedy`` per (context, continuation) request. The number of
continuation tokens that turns a sum into a mean is counted here exactly as lm-eval's HFLM
splits ``context + continuation`` (``TemplateLM._encode_pair``), so a BOS token that a
Llama-style tokenizer prepends is never counted.

Where the numbers can differ from the reference code, on purpose or by necessity:

* fluency: without nltk's punkt data (not installable offline) words come from nltk's
  NLTKWordTokenizer on the whole text, without sentence splitting (``word_tokenizer_name``
  says which ran).
* ZsRE: the answer's tokens are those it has after the question (the reference tokenizes
  it alone, which gives the same tokens for SmolLM2's and Gemma's tokenizers on every bundled
  record); a teacher-forcing step whose context ends in whitespace is read from a greedy
  generation (see ``TokenStep``); the tokens of one character split over byte-level tokens are
  one step, each of them counted as correct when all are the argmax; the reference's Llama
  branch, which inserts an extra space before the decoded prefix, is not reproduced: the prefix
  is the target's own text.
* consistency: a text without any vocabulary word scores 0 (the reference divides 0 by 0), and
  a record without attribute snippets is left out of the mean (the reference stops).

The first sections hold pure functions (given a tokenizer where one is needed); the last one
the lm-eval task base class and how a task finds its records and its tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import unicodedata
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from harness.data.edits import (
    DATA_DIR_ENV,
    EditRequest,
    load_counterfact,
    load_edit_data,
    load_zsre,
)
from harness.errors import UserError
from harness.session import active_editor

log = logging.getLogger(__name__)

SCALE = 100.0  # papers report every editing metric in percent (fluency: entropy x 100)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


# =============================================================================== tokens


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def lm_eval_split(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves whitespace that ends the context to the front of the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def continuation_token_ids(tokenizer, context: str, continuation: str) -> list[int]:
    """Ids of the continuation's tokens as HFLM scores them: encode context + continuation,
    drop as many tokens as the context alone encodes to. Special tokens are left out of both
    encodings, so a prepended BOS cancels and is never counted."""
    context, continuation = lm_eval_split(context, continuation)
    whole = _encode(tokenizer, context + continuation)
    ids = whole[len(_encode(tokenizer, context)):]
    if not ids:
        raise ValueError(f"continuation {continuation!r} adds no token after {context!r}")
    return ids


# ==================================================================== CounterFact scores


@dataclass(frozen=True)
class CandidateScore:
    """One candidate object scored after one prompt."""

    continuation: str  # as scored, with its leading space
    n_tokens: int
    mean_nll: float
    greedy: bool  # every token of the candidate is the argmax under teacher forcing

    @classmethod
    def from_loglikelihood(cls, continuation: str, n_tokens: int, loglikelihood: float,
                           greedy: bool) -> CandidateScore:
        return cls(continuation, n_tokens, -float(loglikelihood) / n_tokens, bool(greedy))


@dataclass(frozen=True)
class PromptComparison:
    """The object a prompt should prefer (rewrite/paraphrase: the new object; neighbourhood:
    the neighbour's true object) against the one it should not."""

    prompt: str
    wanted: CandidateScore
    other: CandidateScore

    @property
    def success(self) -> float:
        return 1.0 if self.wanted.mean_nll < self.other.mean_nll else 0.0

    @property
    def magnitude(self) -> float:
        return math.exp(-self.wanted.mean_nll) - math.exp(-self.other.mean_nll)


def comparison_metrics(name: str, comparisons: Sequence[PromptComparison]) -> dict[str, float]:
    """``name`` (success rate), ``name_magnitude`` (probability margin) and ``name_acc`` (all
    wanted tokens greedy), each the mean over the record's prompts, x100. Empty when the record
    has no prompt of this kind."""
    if not comparisons:
        return {}
    return {
        name: SCALE * _mean(c.success for c in comparisons),
        f"{name}_magnitude": SCALE * _mean(c.magnitude for c in comparisons),
        f"{name}_acc": SCALE * _mean(float(c.wanted.greedy) for c in comparisons),
    }


# ======================================================================= ZsRE accuracy


@dataclass(frozen=True)
class TokenStep:
    """Teacher forcing step i: the prompt followed by the target's first i tokens, and the
    text of token i that should be the argmax there. When a character is split over several
    byte-level tokens (``n_tokens`` > 1) no text ends between them, so those tokens are one
    step whose text is the whole character: correct when each of them is the argmax."""

    context: str
    token: str
    n_tokens: int = 1

    @property
    def context_ends_in_whitespace(self) -> bool:
        # lm-eval would move that whitespace into the continuation and then require the
        # whitespace token to be greedy too; such steps are scored by a greedy generation
        # instead, which reads the argmax right after the context as is
        return self.context != self.context.rstrip()


def _prefix_text(tokenizer, ids: list[int], continuation: str) -> str:
    text = tokenizer.decode(ids)
    # SentencePiece decoders drop the leading space that the continuation starts with
    if not continuation.startswith(text) and continuation.startswith(" " + text):
        return " " + text
    return text


def teacher_forced_steps(tokenizer, prompt: str, target: str) -> list[TokenStep]:
    """The reference builds, for each token i of ``" " + target``, the prompt
    ``question + decode(target_tokens[:i])`` and checks the argmax against token i. The tokens
    are those of the target as it is tokenized after the question (what lm-eval scores), and
    a step ends only where the decoded tokens are a prefix of the target's text: the pieces of a
    character split over byte-level tokens (a partial character decodes to U+FFFD, which the
    reference then re-encodes as other tokens) are scored together."""
    continuation = " " + target
    ids = continuation_token_ids(tokenizer, prompt, continuation)
    prefixes = [_prefix_text(tokenizer, ids[:i], continuation) for i in range(len(ids) + 1)]
    clean = [i for i in range(1, len(ids) + 1) if continuation.startswith(prefixes[i])]
    if not clean or clean[-1] != len(ids):
        # the decoded tokens never give the target's text back (a normalising tokenizer):
        # what follows the last clean prefix is one step
        log.warning("target %r does not decode back from its tokens; its tail is one step", target)
        clean.append(len(ids))
    steps, start = [], 0
    for end in clean:
        here = prefixes[start]
        text = (prefixes[end] if continuation.startswith(prefixes[end]) else continuation)[len(here):]
        if text:
            steps.append(TokenStep(prompt + here, text, end - start))
        else:
            log.warning("target tokens %d-%d of %r decode to no text; not scored", start, end - 1, target)
        start = end
    return steps


def token_accuracy(correct: Sequence[bool]) -> float:
    return SCALE * _mean(float(c) for c in correct)


# ============================================================================ fluency


@lru_cache(maxsize=1)
def _punkt_available() -> bool:
    import nltk

    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            pass
    return False


def word_tokenizer_name() -> str:
    if _punkt_available():
        return "nltk.word_tokenize (punkt sentence splitting, as the reference)"
    return ("nltk NLTKWordTokenizer on the whole text (punkt data not installed, so no "
            "sentence splitting: a period inside the text stays attached to its word)")


def word_tokens(text: str) -> list[str]:
    """The reference uses ``nltk.word_tokenize``, which needs the punkt data; without it we
    run the same word tokenizer that word_tokenize applies to each sentence, on the whole
    text."""
    import nltk

    if _punkt_available():
        return nltk.word_tokenize(text)
    return nltk.tokenize.NLTKWordTokenizer().tokenize(text)


def _entropy_bits(counts: Iterable[int]) -> float:
    counts = np.asarray(list(counts), dtype=float)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Arithmetic mean over n of weight_n * (Shannon entropy in bits of the n-gram frequency
    distribution of the text's words)."""
    tokens = word_tokens(text)
    weighted = [
        w * _entropy_bits(Counter(zip(*(tokens[k:] for k in range(n)))).values())
        for n, w in zip(ns, weights)
    ]
    return _mean(weighted)


def generation_text(prompt: str, generated: str, eos_text: str | None) -> str:
    """The reference decodes prompt and generation together, NFKD-normalises, collapses
    blank lines and drops the end-of-text marker before measuring the text."""
    text = unicodedata.normalize("NFKD", prompt + generated).replace("\n\n", " ")
    return text.replace(eos_text, "") if eos_text else text


# ======================================================================== consistency

ROME_DATA_URL = "https://rome.baulab.info/data/dsets/"
ROME_DATA_FILES = ("idf.npy", "tfidf_vocab.json", "attribute_snippets.json")
ROME_DATA_ENV = "SEQEDIT_ROME_DATA_DIR"
# scikit-learn's default TfidfVectorizer analyzer, which the reference vectorizer uses:
# lower-cased words of two or more word characters
_TERM = re.compile(r"(?u)\b\w\w+\b")


class ReferenceDataUnavailable(UserError, FileNotFoundError):
    """The ROME TF-IDF statistics or attribute snippets are not on this machine."""


@dataclass
class TfidfSpace:
    idf: np.ndarray
    vocabulary: dict[str, int]

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(
            self.vocabulary[t] for t in _TERM.findall(text.lower()) if t in self.vocabulary
        )
        return {i: n * float(self.idf[i]) for i, n in counts.items()}

    def cosine(self, text_a: str, text_b: str) -> float:
        """Cosine of the two TF-IDF vectors (the reference's l2-normalised vectors have the
        same cosine). A text without any vocabulary word has no direction: reported as 0."""
        a, b = self.vector(text_a), self.vector(text_b)
        norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(
            sum(v * v for v in b.values()))
        if norm == 0.0:
            return 0.0
        return sum(v * b.get(i, 0.0) for i, v in a.items()) / norm


@dataclass
class ConsistencyReference:
    space: TfidfSpace
    snippets: dict[tuple[str, str], list[str]]  # (relation_id, object id) -> snippet texts
    directory: Path

    def score(self, generated: Sequence[str], relation_id, target_id) -> float | None:
        """TF-IDF cosine (x100) between the joined generated texts and the joined snippets
        about (relation_id, target_id); None when there are no such snippets."""
        snippets = self.snippets.get((relation_id, target_id))
        if not snippets:
            return None
        return SCALE * self.space.cosine(" ".join(generated), " ".join(snippets))


def rome_data_dir(metadata: dict | None) -> Path | None:
    value = (metadata or {}).get("rome_data_dir") or os.environ.get(ROME_DATA_ENV)
    return Path(value).expanduser() if value else None


def load_consistency_reference(directory: str | os.PathLike) -> ConsistencyReference:
    directory = Path(directory).expanduser()
    missing = [name for name in ROME_DATA_FILES if not (directory / name).is_file()]
    if missing:
        raise ReferenceDataUnavailable(
            f"{directory} lacks {', '.join(missing)} (ROME data release, {ROME_DATA_URL}); "
            "fetch them with harness.tasks.edit_metrics.download_rome_reference_data(dir)"
        )
    idf = np.load(directory / "idf.npy")
    vocabulary = json.loads((directory / "tfidf_vocab.json").read_text(encoding="utf-8"))
    snippets: dict[tuple[str, str], list[str]] = {}
    for entry in json.loads((directory / "attribute_snippets.json").read_text(encoding="utf-8")):
        key = (entry["relation_id"], entry["target_id"])
        snippets.setdefault(key, []).extend(sample["text"] for sample in entry["samples"])
    return ConsistencyReference(TfidfSpace(idf, vocabulary), snippets, directory)


def download_rome_reference_data(directory: str | os.PathLike) -> Path:
    """Fetch idf.npy, tfidf_vocab.json and attribute_snippets.json from the ROME data release
    into ``directory`` (for connected machines; point $SEQEDIT_ROME_DATA_DIR at it)."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    for name in ROME_DATA_FILES:
        target = directory / name
        if target.exists():
            continue
        partial = target.with_name(name + ".part")
        log.info("downloading %s%s", ROME_DATA_URL, name)
        urllib.request.urlretrieve(ROME_DATA_URL + name, partial)
        partial.replace(target)
    return directory


# ===================================================================== task plumbing

DATASET_TITLES = {"counterfact": "CounterFact", "zsre": "ZsRE"}
DATASET_TASKS = {"counterfact": "counterfact_edit", "zsre": "zsre_edit"}


class EditDatasetMismatchError(UserError, ValueError):
    """The editing model edited another dataset than the task scores."""


class TokenizerNotFoundError(UserError, ValueError):
    """No tokenizer to count and decode target tokens with."""


def _check_dataset(dataset: str, found: str | None, what: str) -> None:
    if found is not None and found != dataset:
        raise EditDatasetMismatchError(
            f"{DATASET_TASKS[dataset]} scores {DATASET_TITLES[dataset]} edits but {what} "
            f"{found}; use --model_args edit_data={dataset}, or evaluate this model with "
            f"--tasks {DATASET_TASKS.get(found, '...')}"
        )


def select_records(dataset: str, metadata: dict) -> tuple[list[EditRequest], str]:
    """The records a task scores and where they came from.

    With an editing model alive: exactly the requests it edited, in order; if it edited none,
    the dataset named by its ``edit_data``. Without one: ``data_path`` from the task metadata,
    else $SEQEDIT_DATA_DIR, else the bundled sample."""
    zsre_target = metadata.get("zsre_target", "answers")
    editor = active_editor()
    if editor is not None:
        edited = list(editor.edited_requests or [])
        if edited:
            found = editor.edited_dataset or edited[0].dataset
            _check_dataset(dataset, found, "the model edited")
            return edited, f"the {len(edited)} requests edited by {type(editor).__name__}"
        spec = editor.edit_data
        records = load_edit_data(spec, zsre_target=getattr(editor, "zsre_target", zsre_target))
        if records:
            _check_dataset(dataset, records[0].dataset, f"edit_data={spec} holds")
        return records, f"edit_data={spec} (the editing model edited nothing)"
    data_path = metadata.get("data_path")
    if dataset == "counterfact":
        records = load_counterfact(path=data_path)
    else:
        records = load_zsre(path=data_path, target=zsre_target)
    if data_path:
        source = f"data_path={data_path}"
    elif os.environ.get(DATA_DIR_ENV):
        source = f"${DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]}"
    else:
        source = f"bundled {dataset} sample"
    return records, source


def resolve_tokenizer(metadata: dict):
    """The editing model's tokenizer; else the one lm-eval's model arguments name (they reach
    the task metadata): ``tokenizer``, else ``pretrained`` (+ ``gguf_file``)."""
    from harness.loading import load_tokenizer

    editor = active_editor()
    if editor is not None and getattr(editor, "tokenizer", None) is not None:
        return editor.tokenizer
    options = {k: metadata[k] for k in ("revision", "trust_remote_code") if metadata.get(k)}
    tokenizer = metadata.get("tokenizer")
    if isinstance(tokenizer, (str, os.PathLike)) and str(tokenizer):
        return load_tokenizer(tokenizer, **options)
    pretrained = metadata.get("pretrained")
    if isinstance(pretrained, (str, os.PathLike)) and str(pretrained):
        return load_tokenizer(pretrained, gguf_file=metadata.get("gguf_file"), **options)
    raise TokenizerNotFoundError(
        "the editing tasks count and decode target tokens with the scored model's tokenizer, "
        "but none is known here: pass --metadata '{\"tokenizer\": \"<name or dir>\"}' (in "
        "Python: TaskManager(metadata={\"tokenizer\": ...})), or give the model as "
        "--model_args pretrained=..."
    )


def request_from_doc(doc: dict) -> EditRequest:
    return EditRequest.from_dict({name: doc[name] for name in EditRequest.__dataclass_fields__})


@lru_cache(maxsize=1)
def _warn_chat_template_ignored() -> None:
    log.warning("the editing tasks score the raw prompts, as the reference evaluation does; "
                "--apply_chat_template does not change them")


class EditTask(ConfigurableTask):
    """One doc per edit record (``EditRequest.to_dict()``); subclasses build the requests of a
    record and turn their results into metrics."""

    EDIT_DATASET = ""  # "counterfact" | "zsre"

    def __init__(self, config: dict | None = None, **_):
        cfg = {k: v for k, v in (config or {}).items() if k != "class"}
        cfg.setdefault("test_split", "test")
        # naming our own process_results keeps lm-eval from looking the metric names up in its
        # registry and, failing that, on the Hugging Face hub
        cfg["process_results"] = "process_results"
        cfg["metadata"] = dict(cfg.get("metadata") or {})
        self._tokenizer = None
        super().__init__(config=cfg)

    # ---- records

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        import datasets

        records, source = select_records(self.EDIT_DATASET, self.config.metadata)
        if not records:
            raise ValueError(f"{self.config.task}: no {self.EDIT_DATASET} records to score "
                             f"({source})")
        self.config.metadata["edit_records"] = source
        self.dataset = {"test": datasets.Dataset.from_list([r.to_dict() for r in records])}

    def build_all_requests(self, **kwargs) -> None:
        if active_editor() is not None:
            self.download()  # the model may have edited more since this task was built
        self._tokenizer = resolve_tokenizer(self.config.metadata)
        self.prepare()
        super().build_all_requests(**kwargs)

    def prepare(self) -> None:
        """Hook run once the records and the tokenizer are known, before requests are built."""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self.config.metadata)
        return self._tokenizer

    def doc_to_text(self, doc, doc_to_text=None):
        return request_from_doc(doc).rewrite_prompt

    def doc_to_target(self, doc, doc_to_target=None):
        return doc["target_new"]

    # ---- requests and results

    @staticmethod
    def make_instances(doc: dict, requests: list[tuple[str, tuple]], **kwargs) -> list[Instance]:
        """Instances of a doc from (request type, arguments) pairs, in result order."""
        if kwargs.pop("apply_chat_template", False):
            _warn_chat_template_ignored()
        kwargs.pop("chat_template", None)
        return [
            Instance(request_type=request_type, doc=doc, arguments=args, idx=i, **kwargs)
            for i, (request_type, args) in enumerate(requests)
        ]

    def finish(self, doc: dict, metrics: dict[str, float], scores: dict) -> dict:
        """Attach the per-prompt scores to the doc, so that --log_samples shows them next to
        the prompts, and return the metrics lm-eval should aggregate."""
        # the evaluator logs this very dict object after process_results returns
        doc["scores"] = scores
        if "bypass" in self._metric_fn_list:  # --predict_only
            return {"bypass": None}
        return {k: v for k, v in metrics.items() if k in self._metric_fn_list}
