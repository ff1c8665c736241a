"""wikitext_edit: perplexity of held-out Wikipedia text, a general-capability signal that a small
model shows clearly (its accuracy on GLUE-style tasks sits near chance).

The bundled slice is four whole articles of the WikiText-2 raw test split (articles 1, 3, 5 and 6
of the split; none of them is among the Wikipedia articles whose summaries feed the key
statistics, see ``harness/data/general/LICENSE.md``). ``--metadata '{"wikitext_path": ...}'``
scores another file of ``{"title", "text"}`` records instead, for example the whole split.

Each article is split into documents of consecutive paragraphs of at most ``CHUNK_CHARS``
characters (headings dropped, WikiText's tokenisation undone), so that a document fits one
scoring window of any model and ``--limit`` cuts whole paragraphs. Every document is scored with
lm-eval's ``loglikelihood_rolling``, and the metrics are lm-eval's own aggregations:
word perplexity, byte perplexity and bits per byte over the whole text.
"""

from __future__ import annotations

import re

from harness.data.general import bundled, read_jsonl, splits

BUNDLED = bundled("wikitext2/test_articles_1_3_5_6.jsonl")
CHUNK_CHARS = 4000

# WikiText-2's tokenised text: " @-@ " joins compounds, numbers are split at " @,@ " and " @.@ ",
# and punctuation stands apart from the words
_MARKERS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}%]|'s\b|'re\b|'ve\b|'ll\b|'d\b|n't\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenize(text: str) -> str:
    for marker, joined in _MARKERS:
        text = text.replace(marker, joined)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    return text.strip()


def paragraphs(article: str) -> list[str]:
    """The article's prose lines, without its ``= Heading =`` lines."""
    out = []
    for line in article.split("\n"):
        line = line.strip()
        if line and not (line.startswith("=") and line.endswith("=")):
            out.append(detokenize(line))
    return out


def documents(records: list[dict], chunk_chars: int = CHUNK_CHARS) -> list[dict]:
    docs = []
    for record in records:
        chunk: list[str] = []
        for para in paragraphs(record["text"]):
            if chunk and sum(len(p) + 1 for p in chunk) + len(para) > chunk_chars:
                docs.append({"title": detokenize(record["title"]), "text": "\n".join(chunk)})
                chunk = []
            chunk.append(para)
        if chunk:
            docs.append({"title": detokenize(record["title"]), "text": "\n".join(chunk)})
    return docs


def load_wikitext(wikitext_path: str | None = None, **_ignored):
    """lm-eval ``custom_dataset``: split ``test``, one doc per chunk of an article."""
    return splits(test=documents(read_jsonl(wikitext_path or BUNDLED)))


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
