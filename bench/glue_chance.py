"""Which edit_glue subsets a small unedited model scores measurably above chance, by likelihood.

    python bench/glue_chance.py                       # SmolLM2-135M-Instruct and Gemma-3-270M
    python bench/glue_chance.py --models smollm2 --json out.json

Every scored item of each subset (100 per subset with the bundled data), the subsets' own prompts
and few-shot setting. For each subset: ``acc_likelihood`` with lm-eval's standard error, the chance
level (the bundled subsets are class-balanced: 1/2 for the binary tasks, 1/4 for MMLU's four
letters), z = (acc - chance) / stderr and the one-sided p-value of "no better than chance".
A subset counts as above chance at z >= 2.
"""

from __future__ import annotations

import argparse
import json
import math
import time

CHANCE = {"edit_glue_sst2": 0.5, "edit_glue_mrpc": 0.5, "edit_glue_cola": 0.5, "edit_glue_rte": 0.5,
          "edit_glue_nli": 0.5, "edit_glue_mmlu": 0.25}
MODELS = ("smollm2", "gemma3")  # the embedded models' names for harness.loading


def main(argv=None) -> int:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness import tasks_dir
    from harness.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        # the tasks count answer tokens with the model's tokenizer, named here as there is no
        # editing model to ask
        manager = TaskManager(include_path=tasks_dir(), include_defaults=False, metadata={"tokenizer": name})
        # no edit: lm-eval's own HF model on the loaded weights scores the same requests
        model, tokenizer = load_model(name)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=["edit_glue"], task_manager=manager,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
        seconds = time.perf_counter() - t0
        print(f"\n{name}: edit_glue in {seconds:.0f} s")
        print(f"{'subset':<16}{'n':>5}{'acc_lik':>9}{'stderr':>8}{'chance':>8}{'z':>7}{'p':>9}  above")
        for task, chance in CHANCE.items():
            res = out["results"][task]
            acc, err = res["acc_likelihood,none"], res["acc_likelihood_stderr,none"]
            n = out["n-samples"][task]["effective"]
            z = (acc - chance) / err if err else math.nan
            pval = 0.5 * math.erfc(z / math.sqrt(2)) if math.isfinite(z) else math.nan
            row = {"model": name, "subset": task, "n": n, "acc_likelihood": acc, "stderr": err,
                   "chance": chance, "z": z, "p_one_sided": pval, "above_chance": z >= 2,
                   "f1_generate": res.get("f1_generate,none"), "invalid_generate": res.get("invalid_generate,none")}
            rows.append(row)
            print(f"{task:<16}{n:>5}{acc:>9.3f}{err:>8.3f}{chance:>8.2f}{z:>7.2f}{pval:>9.4f}  "
                  f"{'yes' if row['above_chance'] else 'no'}", flush=True)
        del lm, model
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
