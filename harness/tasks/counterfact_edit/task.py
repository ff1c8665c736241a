"""CounterFact editing tasks.

``counterfact_edit_scores``: two loglikelihood requests per prompt (wanted and other object,
each with a leading space) for the rewrite prompt, the paraphrases and the neighbourhood
prompts -> efficacy, generalization, specificity with their ``_magnitude`` and ``_acc``.

``counterfact_edit_generation``: top-k sampled continuations of the generation prompts, each
filled up to 100 tokens including the prompt -> fluency (weighted n-gram entropy) and, where the ROME
TF-IDF statistics and attribute snippets are on this machine, consistency.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from harness.data.edits import EditRequest
from harness.tasks.edit_metrics import (
    ROME_DATA_ENV,
    SCALE,
    CandidateScore,
    EditTask,
    PromptComparison,
    ReferenceDataUnavailable,
    comparison_metrics,
    continuation_token_ids,
    generation_text,
    load_consistency_reference,
    ngram_entropy,
    request_from_doc,
    rome_data_dir,
    word_tokenizer_name,
)
from harness.tasks.notes import UNAVAILABLE_NOTE

log = logging.getLogger(__name__)

COMPARED_PROMPT_SETS = ("efficacy", "generalization", "specificity")


def comparison_plan(request: EditRequest) -> list[tuple[str, str, str, str]]:
    """(metric, prompt, wanted object, other object) for every scored prompt. Neighbourhood
    prompts should keep their true object (``neighborhood_target``) over the new one."""
    keep = request.neighborhood_target or request.target_true
    return (
        [("efficacy", request.rewrite_prompt, request.target_new, request.target_true)]
        + [("generalization", p, request.target_new, request.target_true)
           for p in request.paraphrase_prompts]
        + [("specificity", p, keep, request.target_new) for p in request.neighborhood_prompts]
    )


class CounterFactScoresTask(EditTask):
    EDIT_DATASET = "counterfact"

    def construct_requests(self, doc, ctx, **kwargs):
        requests = []
        for _, prompt, wanted, other in comparison_plan(request_from_doc(doc)):
            requests += [("loglikelihood", (prompt, " " + wanted)),
                         ("loglikelihood", (prompt, " " + other))]
        return self.make_instances(doc, requests, **kwargs)

    def process_results(self, doc, results):
        compared: dict[str, list[PromptComparison]] = {name: [] for name in COMPARED_PROMPT_SETS}
        for k, (metric, prompt, wanted, other) in enumerate(comparison_plan(request_from_doc(doc))):
            candidates = [
                self._candidate(prompt, " " + obj, *results[2 * k + j])
                for j, obj in enumerate((wanted, other))
            ]
            compared[metric].append(PromptComparison(prompt, *candidates))
        metrics = {}
        for name, comparisons in compared.items():
            metrics.update(comparison_metrics(name, comparisons))
        scores = {name: [asdict(c) for c in comparisons] for name, comparisons in compared.items()}
        return self.finish(doc, metrics, scores)

    def _candidate(self, prompt: str, continuation: str, loglikelihood: float, greedy: bool):
        n_tokens = len(continuation_token_ids(self.tokenizer, prompt, continuation))
        return CandidateScore.from_loglikelihood(continuation, n_tokens, loglikelihood, greedy)


@lru_cache(maxsize=2)
def _consistency_reference(directory: Path):
    return load_consistency_reference(directory)


class CounterFactGenerationTask(EditTask):
    EDIT_DATASET = "counterfact"

    def prepare(self) -> None:
        notes = self.config.metadata
        records = [request_from_doc(d) for d in self.eval_docs]
        without = sum(1 for r in records if not r.generation_prompts)
        if without:
            notes["generation_prompts"] = (
                f"{without} of the {len(records)} records here carry no generation_prompts "
                "(EasyEdit flattened CounterFact); their text is generated from the rewrite "
                "and paraphrase prompts instead"
            )
            log.warning("%s: %s", self.config.task, notes["generation_prompts"])
        else:
            notes["generation_prompts"] = "the records' own generation_prompts"
        notes["fluency_word_tokenizer"] = word_tokenizer_name()
        self.consistency, reason = None, None
        directory = rome_data_dir(notes)
        if directory is None:
            reason = (f"no ROME reference data (idf.npy, tfidf_vocab.json, "
                      f"attribute_snippets.json): set {ROME_DATA_ENV} or --metadata "
                      "'{\"rome_data_dir\": ...}'")
        elif not any(r.relation_id and r.target_new_id for r in records):
            reason = ("the records carry no relation_id / target_new id (EasyEdit flattened "
                      "CounterFact), so there are no attribute snippets to compare with")
        else:
            try:
                self.consistency = _consistency_reference(directory.resolve())
            except ReferenceDataUnavailable as exc:
                reason = str(exc)
        if reason:
            notes["consistency"] = UNAVAILABLE_NOTE + reason
            log.warning("%s: consistency %s", self.config.task, notes["consistency"])
        else:
            notes["consistency"] = f"TF-IDF cosine with the ROME reference data in {directory}"

    def generation_plan(self, request: EditRequest) -> list[tuple[str, int]]:
        """(prompt, tokens to generate). The reference's sampler fills each prompt up to
        ``total_tokens`` tokens, its own length included (harness/generation.py); a prompt
        already that long is measured as it is."""
        total = int(self.config.generation_kwargs["total_tokens"])
        prompts = request.generation_prompts or [request.rewrite_prompt,
                                                 *request.paraphrase_prompts]
        return [(p, total - len(self.tokenizer(p)["input_ids"])) for p in prompts]

    def construct_requests(self, doc, ctx, **kwargs):
        requests = [
            ("generate_until", (prompt, dict(self.config.generation_kwargs)))
            for prompt, budget in self.generation_plan(request_from_doc(doc))
            if budget > 0
        ]
        return self.make_instances(doc, requests, **kwargs)

    def process_results(self, doc, results):
        request = request_from_doc(doc)
        generated = iter(results)
        texts, logged = [], []
        for prompt, budget in self.generation_plan(request):
            text = generation_text(prompt, next(generated) if budget > 0 else "",
                                   self.tokenizer.eos_token)
            texts.append(text)
            logged.append({"prompt": prompt, "max_new_tokens": max(budget, 0), "text": text,
                           "ngram_entropy": ngram_entropy(text)})
        metrics = {"fluency": SCALE * sum(g["ngram_entropy"] for g in logged) / len(logged)}
        scores = {"generations": logged}
        if self.consistency is not None:
            value = self.consistency.score(texts, request.relation_id, request.target_new_id)
            if value is None:
                log.warning("%s: case %s has no attribute snippets for (%s, %s); consistency "
                            "not scored for it", self.config.task, request.case_id,
                            request.relation_id, request.target_new_id)
            else:
                metrics["consistency"] = scores["consistency"] = value
        return self.finish(doc, metrics, scores)
