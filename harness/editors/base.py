"""The batch loop every locate-then-edit editor shares, with MEMIT's residual spreading.

For a batch of requests: target values z* at the last edit layer (all requests optimised
together), then for each edit layer in order: keys on the current (partially edited) model, the
residual still missing at the last layer divided by the number of layers left, the editor's
closed-form solve and the update written in place. After the last layer, each layer's update
may be replaced by its final form (``finish_update``: RECT's sparsification, as the reference
applies it after all layers were solved), then the preservation loss D_t of the weight finally
written and the editor's per-layer bookkeeping (``after_layer``). An editor may keep editing on
weights other than those the model shows between batches (``before_batch`` / ``present``: PRUNE
edits on the raw MEMIT weights and shows them restrained).
An editor subclass supplies ``solve_layer`` and whatever state it carries across batches.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from harness.arch import architecture_for, edit_module, edit_weight, get_module, weight_as_out_in
from harness.editors.context import generate_context_templates
from harness.editors.guard import check_target_values, checked_weight
from harness.editors.keys import StagedForward, average_keys, bare_prompts, templated_prompts
from harness.editors.output_norm import norm_gain, stream_change_as_output_change
from harness.editors.solvers import preservation_loss
from harness.editors.stats import load_or_compute_second_moments
from harness.editors.targets import compute_target_values
from harness.placement import execution_device, input_device, read_parameter, write_parameter

log = logging.getLogger(__name__)


class Editor:
    method = "base"
    uses_stats = True  # whether C0 is needed (every editor logs D_t when it has it)

    def __init__(self, model, tokenizer, hparams, *, cache_dir=None, seed: int = 0, progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.hp = hparams
        self.arch = architecture_for(model)
        n = self.arch.n_layers(model.config)
        bad = [layer for layer in hparams.layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"edit layers {bad} do not exist: the model has {n} layers (0..{n - 1})")
        self.layers = list(hparams.layers)
        self.cache_dir = cache_dir
        self.seed = seed
        self.progress = progress
        self.device = input_device(model)
        self.place_layers()
        self.templates: list[list[str]] | None = None
        self.C0: dict[int, torch.Tensor] = {}
        self.W0: dict[int, torch.Tensor] = {}
        self.batches_done = 0
        self.edits_done = 0
        self.prepared = False

    # ------------------------------------------------------------------ weights
    def place_layers(self) -> None:
        """Each edited layer's statistics, keys and update live where the layer computes (a model
        sharded or offloaded with device_map): call again after changing ``layers``."""
        self.layer_devices = {layer: execution_device(edit_module(self.model, self.arch, layer))
                              for layer in self.layers}

    def weight(self, layer: int) -> torch.Tensor:
        """(d_out, d_in) edited weight of ``layer`` on the layer's device: a view of the parameter,
        or for an offloaded layer a copy (written back by ``set_weight``)."""
        W = edit_weight(self.model, self.arch, layer).to(self.layer_devices[layer])
        return weight_as_out_in(W, self.arch)

    @torch.no_grad()
    def set_weight(self, layer: int, W_new: torch.Tensor) -> None:
        """Write the (d_out, d_in) ``W_new`` as ``layer``'s edited weight, where the model reads it."""
        write_parameter(edit_module(self.model, self.arch, layer), "weight", W_new.T if self.arch.transposed else W_new)

    def through_output_norm(self, layer: int, change: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The (d, n) residual-stream ``change`` as a change of the edited projection's output, for
        an architecture that normalises that output before the residual add (outputs: (n, d), the
        projection's current output at the same positions)."""
        norm = get_module(self.model, self.arch.mlp_out_norm_name(layer))
        device = self.layer_devices[layer]
        gain = norm_gain(norm, change.shape[0], execution_device(norm), outputs.dtype)
        return stream_change_as_output_change(change, outputs.to(device), gain.to(device))

    def edited_modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose weights are edited, by the weight's parameter name."""
        return {self.arch.mlp_out_name(layer) + ".weight": edit_module(self.model, self.arch, layer)
                for layer in self.layers}

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Context templates, key statistics and the original weights, on the unedited model."""
        if self.prepared:
            return
        t0 = time.perf_counter()
        if self.templates is None:
            self.templates = generate_context_templates(self.model, self.tokenizer, self.hp.context_templates, self.seed)
        self.W0 = {layer: self.weight(layer).detach().clone() for layer in self.layers}
        if self.uses_stats:
            mom2 = load_or_compute_second_moments(
                self.model, self.arch, self.tokenizer, self.layers, self.hp.stats_corpus,
                self.hp.stats_samples, self.hp.stats_max_tokens, self.cache_dir, progress=self.progress)
            self.C0 = {layer: m.to(self.layer_devices[layer], torch.float64) for layer, m in mom2.items()}
        self.prepare_state()
        self.prepared = True
        self.prepare_seconds = time.perf_counter() - t0

    def prepare_state(self) -> None:
        """Per-editor state that depends on the statistics (e.g. AlphaEdit's projector)."""

    # ------------------------------------------------------------------ editing
    def apply_batch(self, requests) -> dict:
        """Edit the model in place with one batch; returns the batch's trace record. Every
        update is checked before it is written; if anything fails, the edited weights are put
        back as they were before the batch and the error is raised."""
        self.prepare()
        before: dict[int, torch.Tensor] = {}  # per layer, its weight before this batch wrote it
        try:
            return self._apply_batch(requests, before)
        except BaseException:
            with torch.no_grad():
                for layer, W in before.items():
                    self.set_weight(layer, W)
            self.abort_batch()
            raise

    def _apply_batch(self, requests, before: dict) -> dict:
        phases = defaultdict(float)
        t_start = time.perf_counter()
        self.before_batch()
        last = self.layers[-1]
        t0 = time.perf_counter()
        tv = compute_target_values(self.model, self.arch, self.tokenizer, requests, last, self.templates, self.hp)
        check_target_values(self, tv.z_star, tv.loss)
        phases["targets"] += time.perf_counter() - t0
        solved = []
        t0 = time.perf_counter()
        texts, idxs, owner, group = templated_prompts(self.tokenizer, requests, self.templates)
        keys_pass = StagedForward(self.model, self.arch, self.tokenizer, texts, idxs)
        bare_pass = StagedForward(self.model, self.arch, self.tokenizer, *bare_prompts(self.tokenizer, requests))
        phases["keys"] += time.perf_counter() - t0
        for i, layer in enumerate(self.layers):
            t0 = time.perf_counter()
            # each read starts at this layer's block input, which the layers written so far left as is
            device = self.layer_devices[layer]
            K = average_keys(keys_pass.read("key", layer, resume_from=layer), owner, group, len(requests),
                             len(self.templates)).to(device)
            current = bare_pass.read("hidden", last, resume_from=layer)
            R = ((tv.z_star.to(current.device) - current) / (len(self.layers) - i)).T.to(device)
            if self.arch.mlp_out_norm:
                R = self.through_output_norm(layer, R, bare_pass.read("value", layer, resume_from=layer))
            phases["keys"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            W = self.weight(layer).detach().clone()
            delta = self.solve_layer(i, layer, W, K, R, requests)
            W_new = checked_weight(self, layer, W, delta)
            before[layer] = W
            self.set_weight(layer, W_new)
            solved.append((i, layer, W, K, delta))
            phases["solve"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        finals = []
        for i, layer, W, K, delta in solved:  # all checked before any is written
            final = self.finish_update(layer, W, delta)
            finals.append((i, layer, K, final, checked_weight(self, layer, W, final, "final update")))
        layers_trace = {}
        for i, layer, K, final, W_new in finals:
            self.set_weight(layer, W_new)
            entry = {"update_norm": float(final.float().norm())}
            if layer in self.C0:
                entry["preservation_loss"] = preservation_loss(W_new, self.W0[layer], self.C0[layer])
            entry.update(self.after_layer(i, layer, W_new, K, entry.get("preservation_loss")) or {})
            layers_trace[str(layer)] = entry
        phases["write"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        extra = self.after_batch(requests) or {}
        self.present(layers_trace)
        phases["write"] += time.perf_counter() - t0
        self.batches_done += 1
        self.edits_done += len(requests)
        return self.batch_record(requests, t_start, phases, tv.loss, tv.target_prob, tv.steps, layers_trace, **extra)

    def batch_record(self, requests, t_start: float, phases: dict, losses, target_probs, steps,
                     layers_trace: dict, **extra) -> dict:
        """The per-batch trace record, also for editors that run their own loop (FT, ROME); call it
        after ``batches_done`` and ``edits_done`` count the batch."""
        def mean(values):
            return sum(values) / len(values)

        return {
            "method": self.name,
            "batch": self.batches_done - 1,
            "edits_done": self.edits_done,
            "batch_size": len(requests),
            "edit_seconds": time.perf_counter() - t_start,
            "phase_seconds": dict(phases),
            "target_loss": mean(losses),
            "target_prob": mean(target_probs),
            "target_steps": mean(steps),
            "layers": layers_trace,
            **extra,
        }

    def solve_layer(self, i: int, layer: int, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor, requests) -> torch.Tensor:
        raise NotImplementedError

    def finish_update(self, layer: int, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The update finally written to ``layer`` (whose weight was ``W`` before the batch), once
        every layer of the batch was solved with its dense ``delta`` in place (so later layers'
        residuals saw it): RECT sparsifies here, as the reference does when applying its deltas.
        Return ``delta`` itself to keep it."""
        return delta

    def after_layer(self, i, layer, W_new, K, preservation_loss_value) -> dict | None:
        """Per-layer bookkeeping on the weight finally written (after ``finish_update``)."""
        return None

    def after_batch(self, requests) -> dict | None:
        return None

    def abort_batch(self) -> None:
        """After a failed batch the edited weights are back to what the stream continued from;
        restore whatever else the model showed between batches (PRUNE)."""

    def before_batch(self) -> None:
        """Put in place the weights the edit stream continues from, if the model shows others
        between batches (PRUNE's raw weights)."""

    def present(self, layers_trace: dict) -> None:
        """Give the model the weights it shows until the next batch (PRUNE: the restrained
        accumulated update), adding to ``layers_trace`` what that changed."""

    @property
    def name(self) -> str:
        return self.method

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue the edit stream: edited weights (exact copies) and the
        editor's accumulated state. Statistics are not included (they are cached on disk)."""
        return {
            "method": self.name,
            "batches_done": self.batches_done,
            "edits_done": self.edits_done,
            "templates": self.templates,
            "weights": {n: read_parameter(m).detach().cpu().clone() for n, m in self.edited_modules().items()},
            "editor": self.extra_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.name:
            raise ValueError(f"state was saved by {state['method']!r}, this editor is {self.name!r}")
        self.templates = state["templates"]
        self.prepare()  # statistics and W0 from the still unedited weights
        modules = self.edited_modules()
        for n, value in state["weights"].items():
            write_parameter(modules[n], "weight", value)
        self.batches_done = state["batches_done"]
        self.edits_done = state["edits_done"]
        self.load_extra_state(state["editor"])

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
