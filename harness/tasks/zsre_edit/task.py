"""ZsRE editing task ``zsre_edit_scores``: token-level top-1 accuracy under teacher forcing.

For each token i of ``" " + target`` the context is the question followed by the target's
first i tokens; the step is correct when token i is the argmax there. A step is one
loglikelihood request whose continuation is token i (correct = lm-eval's ``is_greedy``).
When the context ends in whitespace (e.g. the lone space token before a number, " 1998" ->
" ", "1", "9", "9", "8"), lm-eval would move that whitespace into the continuation and also
demand that the space be greedy; such a step is a one-token greedy generation from the
context as it is instead, correct when it produces token i. The byte-level pieces of one
character are one step (one request over all of them, greedy when each is the argmax), which
counts once per token, so the accuracy stays per token of the answer.
"""

from __future__ import annotations

from harness.data.edits import EditRequest
from harness.tasks.edit_metrics import (
    EditTask,
    TokenStep,
    request_from_doc,
    teacher_forced_steps,
    token_accuracy,
)

# the argmax right after the context: greedy tokens, no stop sequence but end-of-text
ARGMAX_GENERATION = {"until": [], "max_gen_toks": 1, "do_sample": False, "temperature": 0.0}


def step_plan(tokenizer, request: EditRequest) -> list[tuple[str, str, str, list[TokenStep]]]:
    """(metric, prompt, target, steps) for the question, its paraphrases and the NQ
    neighbourhood question (whose target is its own answer)."""
    prompt_sets = (
        ("efficacy", [request.rewrite_prompt], request.target_new),
        ("generalization", request.paraphrase_prompts, request.target_new),
        ("specificity", request.neighborhood_prompts, request.neighborhood_target),
    )
    return [
        (metric, prompt, target, teacher_forced_steps(tokenizer, prompt, target))
        for metric, prompts, target in prompt_sets
        for prompt in prompts
    ]


def step_request(step: TokenStep) -> tuple[str, tuple]:
    if step.context_ends_in_whitespace:
        return "generate_until", (step.context, {**ARGMAX_GENERATION, "max_gen_toks": step.n_tokens})
    return "loglikelihood", (step.context, step.token)


def step_correct(step: TokenStep, result) -> list[bool]:
    """One flag per answer token the step covers."""
    if step.context_ends_in_whitespace:
        correct = result == step.token
    else:
        correct = bool(result[1])
    return [correct] * step.n_tokens


class ZsREScoresTask(EditTask):
    EDIT_DATASET = "zsre"

    def construct_requests(self, doc, ctx, **kwargs):
        requests = [
            step_request(step)
            for *_, steps in step_plan(self.tokenizer, request_from_doc(doc))
            for step in steps
        ]
        return self.make_instances(doc, requests, **kwargs)

    def process_results(self, doc, results):
        outcomes = iter(results)
        correct: dict[str, list[bool]] = {}
        scores: dict[str, list[dict]] = {}
        for metric, prompt, target, steps in step_plan(self.tokenizer, request_from_doc(doc)):
            flags = [step_correct(step, next(outcomes)) for step in steps]
            correct.setdefault(metric, []).extend(f for step_flags in flags for f in step_flags)
            scores.setdefault(metric, []).append({
                "prompt": prompt,
                "target": target,
                "steps": [{"context": s.context, "token": s.token, "tokens": s.n_tokens, "correct": f[0]}
                          for s, f in zip(steps, flags)],
            })
        metrics = {metric: token_accuracy(flags) for metric, flags in correct.items() if flags}
        return self.finish(doc, metrics, scores)
