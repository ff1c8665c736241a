"""lm-eval model wrappers that edit the model before (and while) it is evaluated.

Each wrapper is lm-eval's ``HFLM`` around a model whose MLP weights an editor changes: every
lm-eval task works on the edited model. ``num_edits`` requests of ``edit_data`` are applied in
batches of ``edit_batch_size`` when the wrapper is built (``num_edits=0``: the unedited model, the
papers' "pre-edited" row); ``apply_edits`` continues the stream later on the same in-memory model
(the sequential driver does this between evaluations).

    lm_eval --model lyaplock_hf --model_args num_edits=20 --tasks counterfact_edit
    lm_eval --model memit_hf --model_args pretrained=gpt2-xl,edit_data=zsre,num_edits=1000 ...
"""

from __future__ import annotations

import inspect
import logging
import time

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from harness import generation, scoring, session
from harness.data import MalformedRecordError, load_edit_data
from harness.editors import editor_class
from harness.editors.hparams import EditHparams, load_hparams
from harness.errors import ConfigError, unknown_names_error, whole_number
from harness.loading import load_model

log = logging.getLogger(__name__)
generation.install(HFLM)  # the reference fluency sampler (also installed by the lm-eval hook)

DEFAULT_NUM_EDITS = 20
DEFAULT_BATCH_SIZE = 10


def _resolve_device(device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s requested but CUDA is not available: using the CPU", device)
        return "cpu"
    return str(device)


class EditingLM(HFLM):
    method: str = ""

    def __init__(
        self,
        pretrained=None,
        edit_data: str = "counterfact",
        num_edits: int | None = DEFAULT_NUM_EDITS,
        edit_batch_size: int = DEFAULT_BATCH_SIZE,
        hparams=None,
        seed: int = 0,
        cache_dir: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        device_map=None,
        offload_folder: str | None = None,
        gguf_file: str | None = None,
        zsre_target: str = "answers",
        progress: bool = True,
        tokenizer=None,
        batch_size=8,
        **kwargs,
    ):
        self._check_argument_names(kwargs)
        hp_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in EditHparams.keys()}
        n_requested = whole_number("num_edits", num_edits, minimum=0, allow_none=True)
        self.edit_batch_size = whole_number("edit_batch_size", edit_batch_size, minimum=1)
        if zsre_target not in ("answers", "alt"):
            raise ConfigError(f"zsre_target must be 'answers' or 'alt', got {zsre_target!r}")
        # data and hyper-parameters first: a mistake in either costs no model load
        self.edit_data = str(edit_data)
        self.stream = load_edit_data(self.edit_data, limit=None, zsre_target=zsre_target)
        if n_requested is not None and n_requested > len(self.stream):
            raise ConfigError(
                f"num_edits={n_requested} but {self.edit_data} holds {len(self.stream)} records; lower "
                "num_edits or point edit_data at the full data (counterfact:full, zsre:full or a file path)")
        if isinstance(pretrained, str) or pretrained is None:
            model_name = str(pretrained or "smollm2-135m-instruct")
        else:  # an already loaded transformers model (Python use, tests)
            if tokenizer is None:
                raise ConfigError("pass tokenizer= together with an already loaded model")
            model_name = getattr(pretrained.config, "_name_or_path", "") or type(pretrained).__name__
        try:
            self.hparams = load_hparams(self.method, hparams, model_name=model_name, overrides=hp_overrides)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise ConfigError(f"{self.method}_hf: {exc}") from None
        if isinstance(pretrained, str) or pretrained is None:
            model, tok = load_model(pretrained, dtype=dtype, device=_resolve_device(device),
                                    device_map=device_map, offload_folder=offload_folder, gguf_file=gguf_file)
        else:
            model, tok = pretrained, tokenizer
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("max_batch_size", None) if kwargs.get("max_batch_size") is None else None
        super().__init__(pretrained=model, tokenizer=tok, batch_size=batch_size, backend="causal", **kwargs)
        self.model_name = model_name
        self.editor = editor_class(self.method)(self._model, self.tokenizer, self.hparams,
                                                cache_dir=cache_dir, seed=seed, progress=progress)
        self.zsre_target = zsre_target
        self.progress = progress
        self.seed = seed
        self.edited_requests: list = []
        self.trace: list[dict] = []
        self.edited_dataset = self.stream[0].dataset if self.stream else None
        session.register_editor(self)
        n = len(self.stream) if n_requested is None else n_requested
        if n:
            self.check_prompt_lengths(self.stream[:n])
            self.apply_edits(self.stream[:n])

    @classmethod
    def valid_argument_names(cls) -> set[str]:
        """What ``--model_args`` may hold: this wrapper's own arguments, the editing
        hyper-parameters and lm-eval's HFLM arguments."""
        own = set(inspect.signature(EditingLM.__init__).parameters)
        hf = set(inspect.signature(getattr(HFLM.__init__, "__wrapped__", HFLM.__init__)).parameters)
        return (own | hf | EditHparams.keys()) - {"self", "kwargs", "args"}

    def _check_argument_names(self, kwargs: dict) -> None:
        valid = self.valid_argument_names()
        unknown = set(kwargs) - valid
        if unknown:
            raise unknown_names_error(f"argument(s) of {self.method}_hf:", unknown, valid)

    def check_prompt_lengths(self, requests) -> None:
        """Every text of ``requests`` must fit the model's context together with the longest
        context template the editor prefixes: a longer one is an error naming its file and line,
        before any edit (the model would otherwise see it truncated, or fail mid-run)."""
        from harness.editors.stats import model_context_length

        context = model_context_length(self._model)
        prefix = max((length for length, _ in self.hparams.context_templates), default=0)
        budget = context - prefix
        fields, texts = [], []
        for req in requests:
            for field_name, text in req.texts().items():
                fields.append((req, field_name))
                texts.append(text)
        for start in range(0, len(texts), 4096):
            chunk = texts[start:start + 4096]
            lengths = [len(ids) for ids in self.tokenizer(chunk, add_special_tokens=True)["input_ids"]]
            for offset, length in enumerate(lengths):
                if length > budget:
                    req, field_name = fields[start + offset]
                    where = req.source or f"{req.dataset} case_id {req.case_id!r}"
                    raise MalformedRecordError(
                        f"{where}: {field_name} is {length} tokens long; {self.model_name} takes {context} "
                        f"tokens, {prefix} of them kept for the context templates, so at most {budget}")

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # the editing tasks' requests overlap (harness/scoring.py); the values are HFLM's
        return scoring.loglikelihood_tokens(
            self, requests, lambda reqs: HFLM._loglikelihood_tokens(self, reqs, disable_tqdm=True), disable_tqdm)

    # ------------------------------------------------------------------ editing
    def apply_edits(self, requests, batch_size: int | None = None, on_batch=None) -> list[dict]:
        """Apply ``requests`` in batches (continuing the stream); returns their trace records.
        ``on_batch(trace_record)`` is called after each batch (the driver checkpoints there)."""
        batch_size = batch_size or self.edit_batch_size
        records = []
        bar = tqdm(total=len(requests), desc=f"{self.method} edits", unit="edit", disable=not self.progress)
        self._model.eval()
        for start in range(0, len(requests), batch_size):
            batch = list(requests[start:start + batch_size])
            record = self.editor.apply_batch(batch)
            record["wall_time"] = time.time()
            self.edited_requests.extend(batch)
            if self.edited_dataset is None:
                self.edited_dataset = batch[0].dataset
            self.trace.append(record)
            records.append(record)
            bar.update(len(batch))
            bar.set_postfix(self._postfix(record))
            if on_batch is not None:
                on_batch(record)
        bar.close()
        return records

    @staticmethod
    def _postfix(record):
        post = {"loss": f"{record['target_loss']:.3f}"}
        losses = [v.get("preservation_loss") for v in record["layers"].values() if v.get("preservation_loss") is not None]
        if losses:
            post["D_max"] = f"{max(losses):.3g}"
        qs = [v["q_next"] for v in record["layers"].values() if "q_next" in v]
        if qs:
            post["q_max"] = f"{max(qs):.3g}"
        return post

    @property
    def num_edited(self) -> int:
        return len(self.edited_requests)

    # ------------------------------------------------------------------ state
    def edit_state(self) -> dict:
        return {
            "editor": self.editor.state_dict(),
            "edited_case_ids": [r.case_id for r in self.edited_requests],
            "trace": self.trace,
        }

    def load_edit_state(self, state: dict) -> None:
        self.editor.load_state_dict(state["editor"])
        by_id = {r.case_id: r for r in self.stream}
        self.edited_requests = [by_id[c] for c in state["edited_case_ids"]]
        self.trace = list(state["trace"])


@register_model("memit_hf")
class MEMITLM(EditingLM):
    method = "memit"


@register_model("alphaedit_hf")
class AlphaEditLM(EditingLM):
    method = "alphaedit"


@register_model("lyaplock_hf")
class LyapLockLM(EditingLM):
    method = "lyaplock"


@register_model("ft_hf")
class FTLM(EditingLM):
    method = "ft"


@register_model("rome_hf")
class ROMELM(EditingLM):
    method = "rome"


@register_model("prune_hf")
class PRUNELM(EditingLM):
    method = "prune"


@register_model("rect_hf")
class RECTLM(EditingLM):
    method = "rect"


@register_model("rlsedit_hf")
class RLSEditLM(EditingLM):
    method = "rlsedit"


@register_model("encore_hf")
class ENCORELM(EditingLM):
    method = "encore"
