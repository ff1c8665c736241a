"""wikitext_edit: perplexity of held-out WikiText-2 articles through lm-eval's
loglikelihood_rolling, on an editing wrapper."""

import gzip
import json
import math

import pytest
import torch

from harness.data.general import read_jsonl
from harness.tasks.wikitext_edit.utils import BUNDLED, detokenize, documents, load_wikitext
from harness.testing import tiny_model


def test_detokenize_undoes_wikitext_markers_and_punctuation_spacing():
    raw = " The Ise @-@ class ( 1 @,@ 200 t ) was 3 @.@ 5 m deep , and it 's \" long \" ; it was n't . "
    assert detokenize(raw) == "The Ise-class (1,200 t) was 3.5 m deep, and it's \" long \"; it wasn't."


def test_documents_drop_headings_and_keep_paragraphs_whole(tmp_path):
    path = tmp_path / "articles.jsonl"
    text = "\n".join([" = A = ", " First paragraph . ", " = = Life = = ", " Second one @-@ here . ", ""])
    path.write_text(json.dumps({"title": "A", "text": text}) + "\n"
                    + json.dumps({"title": "B", "text": " = B = \n" + " word" * 30 + " . "}) + "\n")
    docs = documents(read_jsonl(path), chunk_chars=40)
    assert [d["text"] for d in docs] == ["First paragraph.\nSecond one-here.", ("word " * 30).strip() + "."]
    assert [d["title"] for d in docs] == ["A", "B"]
    assert load_wikitext(str(path))["test"].num_rows == 2


def test_bundled_articles_are_not_in_the_statistics_corpus():
    from harness.editors.stats import BUNDLED_CORPUS

    with gzip.open(BUNDLED_CORPUS, "rt") as fh:
        corpus = [json.loads(line) for line in fh]
    titles = {r["title"].lower() for r in corpus}
    articles = read_jsonl(BUNDLED)
    assert len(articles) == 4 and not {detokenize(a["title"]).lower() for a in articles} & titles
    text = " ".join(r["text"] for r in corpus)
    for doc in documents(articles):
        for sentence in doc["text"].split(". "):
            if len(sentence) > 60:
                assert sentence not in text


def _rolling_loglikelihood(model, tok, text, max_length, prefix_token):
    """The sum of log p(token | everything before it, at most ``max_length`` tokens) over the text,
    the first token predicted after ``prefix_token``: a direct forward pass per window."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total = 0.0
    ids = tok(text, add_special_tokens=False).input_ids
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            ids, prefix_token=prefix_token, max_seq_len=max_length, context_len=1)):
        seq = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[:, :-1]).logits[0].float(), -1)
        positions = range(len(context) - 1, seq.shape[1] - 1)
        total += sum(float(logp[p, seq[0, p + 1]]) for p in positions)
    return total


def test_perplexity_on_an_editing_wrapper_is_the_rolling_loglikelihood_of_the_documents():
    import lm_eval
    from lm_eval.tasks import TaskManager

    from harness import tasks_dir
    from harness.models import MEMITLM

    model, tok = tiny_model("llama")
    lm = MEMITLM(pretrained=model, tokenizer=tok, hparams="smollm2-135m", layers=[1], num_edits=0, progress=False,
                 batch_size=4)
    manager = TaskManager(include_path=tasks_dir(), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["wikitext_edit"], limit=3, task_manager=manager)
    got = out["results"]["wikitext_edit"]
    docs = documents(read_jsonl(BUNDLED))[:3]
    assert max(len(tok(d["text"]).input_ids) for d in docs) > lm.max_length  # several windows
    ll = sum(_rolling_loglikelihood(model, tok, d["text"], lm.max_length, lm.prefix_token_id) for d in docs)
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    words = sum(len(d["text"].split()) for d in docs)
    assert got["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-4)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
