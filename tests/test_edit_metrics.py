"""The metric definitions of harness/tasks/edit_metrics.py against hand-worked examples and
the reference's own tools (scikit-learn's TF-IDF vectoriser, nltk's tokenizer)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from harness.tasks import edit_metrics as em


@pytest.fixture(scope="module")
def tok():
    from harness.testing import tiny_tokenizer

    return tiny_tokenizer()


# ------------------------------------------------------------------------------- fluency


def test_ngram_entropy_hand_worked():
    # words: cat dog cat dog -> bigrams (cat,dog) x2, (dog,cat) x1 -> H2 = h(1/3)
    # trigrams (cat,dog,cat), (dog,cat,dog) -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    expected = ((2 / 3) * h2 + (4 / 3) * 1.0) / 2
    assert em.ngram_entropy("cat dog cat dog") == pytest.approx(expected, abs=1e-12)
    # all n-grams distinct: H_n = log2(count)
    text = "one two three four five"
    assert em.ngram_entropy(text) == pytest.approx(((2 / 3) * 2 + (4 / 3) * math.log2(3)) / 2)


def test_ngram_entropy_of_repetitive_text_is_low_and_of_short_text_zero():
    assert em.ngram_entropy("the the the the the the") == 0.0
    assert em.ngram_entropy("single") == 0.0  # no bigram at all
    assert em.ngram_entropy("the cat sat on the mat today") > em.ngram_entropy("a b a b a b a")


def test_word_tokens_split_punctuation_like_nltk():
    words = em.word_tokens('He said, "it works" (twice).')
    assert words[:3] == ["He", "said", ","]
    assert "``" in words and "''" in words and "(" in words and words[-1] == "."


def test_word_tokens_without_punkt_keep_inner_periods():
    words = em.word_tokens("It is English. Yes.")
    if em._punkt_available():  # the reference: sentence splitting first
        assert words == ["It", "is", "English", ".", "Yes", "."]
    else:
        assert words == ["It", "is", "English.", "Yes", "."]
        assert "no sentence splitting" in em.word_tokenizer_name()


def test_generation_text_normalises_like_the_reference():
    text = em.generation_text("Café", " open\n\nnow<|im_end|>", "<|im_end|>")
    assert text == "Cafe\u0301 open now"  # NFKD splits the accent, blank line collapsed


# --------------------------------------------------------------------- CounterFact scores


def _candidate(nll, greedy=False):
    return em.CandidateScore(" x", 1, nll, greedy)


def test_comparison_metrics_hand_worked():
    comparisons = [
        em.PromptComparison("p1", _candidate(1.0, True), _candidate(2.0)),
        em.PromptComparison("p2", _candidate(3.0), _candidate(0.5)),
    ]
    m = em.comparison_metrics("generalization", comparisons)
    assert m["generalization"] == 50.0
    assert m["generalization_acc"] == 50.0
    margin = ((math.exp(-1) - math.exp(-2)) + (math.exp(-3) - math.exp(-0.5))) / 2
    assert m["generalization_magnitude"] == pytest.approx(100 * margin)
    assert em.comparison_metrics("generalization", []) == {}


def test_candidate_mean_nll_divides_by_token_count():
    c = em.CandidateScore.from_loglikelihood(" New York", 2, -5.0, False)
    assert c.mean_nll == 2.5
    # a tie is not a success: the reference asks for a strictly smaller NLL
    assert em.PromptComparison("p", _candidate(1.0), _candidate(1.0)).success == 0.0


# ----------------------------------------------------------------------- token accounting


def test_continuation_tokens_exclude_bos_and_follow_lm_eval_split(tok):
    from copy import deepcopy

    bos_tok = deepcopy(tok)
    bos_tok.add_bos_token = True
    assert bos_tok(" English").input_ids[0] == bos_tok.bos_token_id  # Llama-style
    plain = tok(" English", add_special_tokens=False).input_ids
    for t in (tok, bos_tok):
        assert em.continuation_token_ids(t, "The mother tongue of X is", " English") == plain
    # a context ending in a space gives that space to the continuation, as lm-eval does
    assert em.lm_eval_split("Paris is in ", "France") == ("Paris is in", " France")
    assert em.continuation_token_ids(tok, "Paris is in ", "France") == tok(
        " France", add_special_tokens=False).input_ids


def test_teacher_forced_steps_for_a_number(tok):
    steps = em.teacher_forced_steps(tok, "When was it founded?", "1998")
    q = "When was it founded?"
    assert [(s.context, s.token) for s in steps] == [
        (q, " "), (q + " ", "1"), (q + " 1", "9"), (q + " 19", "9"), (q + " 199", "8")]
    assert [s.context_ends_in_whitespace for s in steps] == [False, True, False, False, False]
    assert em.token_accuracy([True, False, True, True]) == 75.0


class _SentencePieceLike:
    """Word-piece tokenizer whose decode drops the leading space, as SentencePiece does."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab) + 1)

    def __call__(self, text, add_special_tokens=True):
        pieces = [p.replace(" ", "\u2581") for p in re.findall(r" ?\S+", text)]
        return {"input_ids": ([0] if add_special_tokens else []) + [self._id(p) for p in pieces]}

    def decode(self, ids):
        pieces = {v: k for k, v in self.vocab.items()}
        return "".join(pieces[i] for i in ids if i).replace("\u2581", " ").lstrip(" ")


def test_teacher_forced_steps_restore_the_space_sentencepiece_drops():
    steps = em.teacher_forced_steps(_SentencePieceLike(), "Q?", "New York City")
    assert [(s.context, s.token) for s in steps] == [
        ("Q?", " New"), ("Q? New", " York"), ("Q? New York", " City")]


# answers whose characters SmolLM2's byte-level BPE splits over several tokens (from ZsRE)
SPLIT_CHARACTERS = [("Which sports team is Ilgar Nabiyev playing for?", "TKİ Tavşanlı Linyitspor"),
                    ("What sports team was Piotr Celeban a member of?", "Śląsk Wrocław")]


@pytest.mark.parametrize("family", ["smollm2", "gemma"])
def test_zsre_steps_cover_exactly_the_answer_tokens(family, request):
    """On the real tokenizers, every ZsRE prompt of the bundled sample (and answers with split
    characters): the steps' texts put together are the answer, and each step's text, after its
    context, is exactly the next answer token(s) as lm-eval tokenizes the answer after the
    question; the answer alone tokenizes the same (what the reference scores)."""
    from harness.data import load_zsre

    tok = request.getfixturevalue(f"{family}_tokenizer")
    cases = SPLIT_CHARACTERS[:]
    for r in load_zsre():
        cases += [(r.rewrite_prompt, r.target_new), *((p, r.target_new) for p in r.paraphrase_prompts),
                  *((p, r.neighborhood_target) for p in r.neighborhood_prompts)]
    merged = 0
    for prompt, target in cases:
        steps = em.teacher_forced_steps(tok, prompt, target)
        ids = em.continuation_token_ids(tok, prompt, " " + target)
        assert "".join(s.token for s in steps) == " " + target
        assert sum(s.n_tokens for s in steps) == len(ids)
        i = 0
        for s in steps:
            assert s.context == prompt + (" " + target)[:len(s.context) - len(prompt)]
            scored = em._encode(tok, s.context + s.token)[len(em._encode(tok, s.context)):]
            assert scored == ids[i:i + s.n_tokens], (prompt, target, s)
            i += s.n_tokens
        assert tok(" " + target, add_special_tokens=False).input_ids == ids
        merged += any(s.n_tokens > 1 for s in steps)
    assert len(cases) > 1000
    # SmolLM2 splits 'İ', 'ş', 'ą', ...; Gemma's vocabulary has them whole
    assert (merged >= 2) if family == "smollm2" else merged == 0


def test_a_split_character_is_one_step_counted_per_token():
    from harness.tasks.zsre_edit.task import step_correct, step_request

    step = em.TokenStep("Q? TK", "İ", 2)
    assert step_request(step) == ("loglikelihood", ("Q? TK", "İ"))
    assert step_correct(step, (-1.0, True)) == [True, True]
    assert step_correct(step, (-1.0, False)) == [False, False]
    spaced = em.TokenStep("Q? ", "İ", 2)
    kind, (context, gen) = step_request(spaced)
    assert kind == "generate_until" and context == "Q? " and gen["max_gen_toks"] == 2
    assert step_correct(spaced, "İ") == [True, True] and step_correct(spaced, "I") == [False, False]


# ---------------------------------------------------------------------------- consistency


def _write_reference(directory, idf, vocab, snippets):
    np.save(directory / "idf.npy", np.asarray(idf, dtype=float))
    (directory / "tfidf_vocab.json").write_text(json.dumps(vocab))
    (directory / "attribute_snippets.json").write_text(json.dumps(snippets))


def test_tfidf_cosine_hand_worked():
    space = em.TfidfSpace(np.array([1.0, 2.0, 3.0]), {"paris": 0, "france": 1, "city": 2})
    # a: paris x2, city x1 -> (2, 0, 3); b: france, city -> (0, 2, 3); cos = 9 / 13
    assert space.cosine("Paris, paris: a city!", "France city") == pytest.approx(9 / 13)
    assert space.cosine("Paris", "Paris") == pytest.approx(1.0)
    assert space.cosine("no known word", "Paris") == 0.0


def test_tfidf_cosine_matches_the_reference_sklearn_vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = ["Danielle Darrieux spoke French in Paris", "English is spoken in London",
              "The city of Paris is the capital of France", "a b c London London"]
    fitted = TfidfVectorizer().fit(corpus)  # the reference's collect_stats recipe
    vocab = {k: int(v) for k, v in fitted.vocabulary_.items()}
    space = em.TfidfSpace(fitted.idf_, vocab)
    a = "Paris and London, the capital cities; French and English."
    b = "Darrieux spoke French in Paris, the capital of France."
    encs = fitted.transform([a, b]).toarray()
    reference = float(encs[0] @ encs[1] / np.linalg.norm(encs[0]) / np.linalg.norm(encs[1]))
    assert space.cosine(a, b) == pytest.approx(reference, abs=1e-12)


def test_consistency_reference_loads_rome_files(tmp_path):
    _write_reference(
        tmp_path, [1.0, 2.0, 3.0], {"paris": 0, "france": 1, "city": 2},
        [{"relation_id": "P17", "target_id": "Q142", "samples": [
            {"name": "Lyon", "text": "France"}, {"name": "Nice", "text": "city"}]},
         {"relation_id": "P17", "target_id": "Q30", "samples": [{"name": "X", "text": "Paris"}]}],
    )
    ref = em.load_consistency_reference(tmp_path)
    assert ref.snippets[("P17", "Q142")] == ["France", "city"]
    # generated texts joined: "Paris paris city" -> (2,0,3); snippets joined "France city"
    assert ref.score(["Paris paris", "city"], "P17", "Q142") == pytest.approx(100 * 9 / 13)
    assert ref.score(["Paris"], "P17", "Q999") is None


def test_missing_reference_files_name_the_fix(tmp_path, monkeypatch):
    (tmp_path / "idf.npy").write_bytes(b"")
    with pytest.raises(em.ReferenceDataUnavailable, match="tfidf_vocab.json.*download_rome"):
        em.load_consistency_reference(tmp_path)
    monkeypatch.setenv(em.ROME_DATA_ENV, str(tmp_path / "env"))
    assert em.rome_data_dir({}) == tmp_path / "env"
    assert em.rome_data_dir({"rome_data_dir": str(tmp_path)}) == tmp_path
    monkeypatch.delenv(em.ROME_DATA_ENV)
    assert em.rome_data_dir({}) is None
