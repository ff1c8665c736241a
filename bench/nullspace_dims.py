"""How much of each edited layer AlphaEdit's null-space threshold keeps, per embedded model.

    python bench/nullspace_dims.py                 # SmolLM2-135M-Instruct and Gemma-3-270M
    python bench/nullspace_dims.py --threshold 0.02 --models gemma3

The threshold is absolute, on the eigenvalues of the key statistics C0 (the mean of k k^T over the
statistics corpus), so where it falls depends on the model's key scale. For every edited layer of
the model's AlphaEdit file: d_ff, the dimensions kept (eigenvalue below the threshold) and the
eigenvalue quantiles. Uses the cached statistics (computed once otherwise).
"""

from __future__ import annotations

import argparse

MODELS = ("smollm2", "gemma3")


def main(argv=None) -> int:
    import torch

    from harness.editors import editor_class
    from harness.editors.hparams import load_hparams
    from harness.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threshold", type=float, default=None, help="default: each model's AlphaEdit file")
    args = p.parse_args(argv)
    quantiles = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    print("| model | layer | d_ff | threshold | kept | eigenvalue quantiles 1 / 10 / 50 / 90 / 99% |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, tok = load_model(name)
        hp = load_hparams("alphaedit", None, model_name=name)
        threshold = hp.nullspace_threshold if args.threshold is None else args.threshold
        editor = editor_class("alphaedit")(model, tok, hp, progress=False)
        editor.prepare()
        for layer in editor.layers:
            eig = torch.linalg.eigvalsh(editor.C0[layer])
            q = " / ".join(f"{float(v):.3g}" for v in torch.quantile(eig, quantiles))
            print(f"| {name} | {layer} | {eig.numel()} | {threshold:g} | {int((eig < threshold).sum())} | {q} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
