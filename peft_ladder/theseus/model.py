"""The Theseus tuner: successor layers that progressively replace modules of the predecessor, then stand alone.

Data flow of one training forward:

1. a pre-hook on the model counts the forward and draws, for every module, whether its successor layer replaces it
   (:func:`~.schedule.draw_replacements`, seeded from the config's seed and the forward count);
2. a pre-hook on each module that owns a compressed layer list sets the list's *plan*: per module, the successor
   layer or the module's predecessor layers (:mod:`.routing`); the family's own loop then runs the plan;
3. after each step of an optimizer that holds successor parameters, a global optimizer post-hook advances the
   schedule (phase 1, then phase 2 where p = 1: see :mod:`.schedule`).

With distillation on (:mod:`.distill`), the pre-hook also runs the predecessor alone on the batch (or finds its cached
logits), and a forward hook adds the distillation terms to the model's loss.

In eval mode the plan is the successor layers alone, so eval metrics measure the compressed model. With adapters
disabled (or none left) it is the predecessor's layers. ``merge_and_unload()`` puts the successor layers in place of
the predecessor's and updates the config: the result is the compact model, same class, no PEFT inside.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

from .._tuner import ModuleTuner
from ..backbone import LAYER_COUNT_KEYS, LayerStack, inspect_backbone
from ..fidelity import layer_fidelity
from . import distill, hooks, routing
from . import successor as successor_build
from .schedule import draw_replacements, replacing_rate, replacing_steps
from .start import most_faithful_layers

# Config fields that hold one entry per layer and must be cut with the stack (Llama/Qwen/Mistral/Gemma `layer_types`).
PER_LAYER_CONFIG_KEYS = ("layer_types",)


class TheseusSuccessor(nn.Module):
    """One adapter's state: the successor layers of every compressed stack and the schedule's counters.

    Attributes:
        stacks: One ``nn.ModuleList`` of successor layers per compressed stack.
        stack_paths: Dotted path of each compressed stack in the base model.
        layer_count_keys: Per stack, the config field holding its depth (updated by extraction).
        modules_per_stack: Per stack, the predecessor layer range that each successor layer replaces.
        optimizer_steps: Buffer: optimizer steps taken with the successor's parameters (drives the rate).
        training_forwards: Buffer: training forwards run so far (indexes the draws).
        current_draws: Per stack, per module, whether the last training forward ran the successor layer.
    """

    def __init__(self, stacks: list[nn.ModuleList], predecessor_stacks: list[LayerStack], modules: list[list[range]]):
        super().__init__()
        self.stacks = nn.ModuleList(stacks)
        self.stack_paths = tuple(stack.path for stack in predecessor_stacks)
        self.layer_count_keys = tuple(stack.layer_count_key for stack in predecessor_stacks)
        self.modules_per_stack = tuple(tuple(ranges) for ranges in modules)
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long))
        self.current_draws: list[list[bool]] | None = None

    @property
    def num_modules(self) -> int:
        return sum(len(ranges) for ranges in self.modules_per_stack)


class TheseusModel(ModuleTuner):
    """BERT-of-Theseus (Xu et al., EMNLP 2020) as a PEFT tuner; see [`TheseusConfig`] and the module docstring.

    Use it through ``peft.get_peft_model(finetuned_model, TheseusConfig(...))``; ``peft_model.merge_and_unload()``
    returns the compressed model. Attach [`TheseusCallback`] to a ``Trainer`` to plan both phases from its length, keep
    checkpoint selection and early stopping on phase 2, and log the replacing rate.
    """

    prefix = "theseus_"
    adapter_attribute = "theseus_modules"
    card_tags = ("theseus", "bert-of-theseus", "model-compression")  # see peft_ladder._hub
    # Successor layers replace the predecessor's layers inside the same forward and become the compact model's
    # weights, so they keep the predecessor's dtype instead of PEFT's fp32 upcast.
    upcast_adapter_weights = False

    # ------------------------------------------------------------------ building
    def _build_adapter_module(self, model: nn.Module, config, adapter_name: str) -> TheseusSuccessor:
        stacks = inspect_backbone(model, layers_path=config.layers_path).stacks
        for stack in stacks:
            successor_build.check_stack_can_compress(stack)
        # a loaded adapter meets the predecessor it was trained on
        module_ranges = successor_build.module_ranges(config, stacks)
        for stack in stacks:
            if config.num_successor_layers > stack.num_layers:
                raise ValueError(
                    f"num_successor_layers={config.num_successor_layers} is more than the {stack.num_layers} layers "
                    f"of the predecessor's stack '{stack.path}': the successor must be smaller. Choose at most "
                    f"{stack.num_layers} (to compress one stack only, set `layers_path`)."
                )
        if config.distill_hidden_weight > 0 and len(stacks) > 1:
            raise ValueError(
                "distill_hidden_weight > 0 matches hidden states at the module boundaries of one compressed stack; "
                f"this model has {len(stacks)} ({', '.join(stack.path for stack in stacks)}). Set "
                "distill_hidden_weight=0 or compress one stack (layers_path)."
            )
        sources = self._successor_sources(model, config, stacks, module_ranges)
        successor_stacks = []
        for stack, stack_sources in zip(stacks, sources):
            predecessor = routing.predecessor_layers(stack.layers)
            successor_stacks.append(nn.ModuleList(successor_build.init_successor(predecessor, stack_sources)))
        config.predecessor_shape = successor_build.shape_record(stacks, module_ranges)
        config.successor_sources = sources
        return TheseusSuccessor(successor_stacks, list(stacks), module_ranges)

    def _successor_sources(
        self, model: nn.Module, config, stacks: list[LayerStack], module_ranges: list[list[range]]
    ) -> list[list[int]]:
        """Per stack, the predecessor layer each successor layer starts as a copy of (see ``successor_init``)."""
        init = config.successor_init
        if getattr(config, "_theseus_loaded_from_checkpoint", False) and config.successor_sources:
            # a record of where training started; the saved weights load over these copies
            return successor_build.check_recorded_sources(config.successor_sources, stacks, module_ranges)
        if isinstance(init, list):
            for stack in stacks:
                out_of_range = [index for index in init if index >= stack.num_layers]
                if out_of_range:
                    raise ValueError(
                        f"successor_init names layers {out_of_range}, but the predecessor's stack '{stack.path}' has "
                        f"{stack.num_layers} layers (0 to {stack.num_layers - 1})."
                    )
            return [list(init) for _ in stacks]
        if init == "one_per_module":
            return [[module[-1] for module in ranges] for ranges in module_ranges]
        if init == "fidelity":
            with self._predecessor_only():
                table = layer_fidelity(
                    model, module_ranges, config.calibration_inputs, layers_path=[stack.path for stack in stacks]
                )
            return [most_faithful_layers(table, stack, ranges) for stack, ranges in zip(stacks, module_ranges)]
        return [list(range(len(ranges))) for ranges in module_ranges]

    def _attach(self, model: nn.Module, adapter_name: str) -> None:
        state = self._routing_state()
        if not state["handles"]:
            state["handles"].append(model.register_forward_pre_hook(self._before_model_forward, with_kwargs=True))
            # the distillation hook reads what the pre-hook gathered; the always-called one then clears it
            state["handles"].append(model.register_forward_hook(self._add_distillation_terms))
            state["handles"].append(model.register_forward_hook(self._after_model_forward, always_call=True))
            state["handles"].append(hooks.track_optimizer_steps(self))  # forgotten too when the model is collected
        for path in self.adapter_modules[adapter_name].stack_paths:
            if path in state["stacks"]:
                continue
            layers = model.get_submodule(path)
            owner = model.get_submodule(path.rpartition(".")[0])
            state["stacks"][path] = routing.make_replaceable(layers)
            state["handles"].append(owner.register_forward_pre_hook(hooks.stack_hook(self, path, layers)))
            state["handles"].append(
                owner.register_forward_hook(hooks.after_stack_hook(self, layers), always_call=True)
            )

    def _routing_state(self) -> dict:
        # plain attribute, looked up in __dict__: BaseTuner forwards missing attributes to the base model
        return self.__dict__.setdefault(
            "_theseus_routing",
            {
                "stacks": {},
                "handles": [],
                "grad_fallback": False,
                "predecessor_only": False,
                "distill": None,  # the pending distillation terms of the forward in progress
                "teacher_logits": {},  # example key -> the predecessor's logits (see .distill)
            },
        )

    @contextlib.contextmanager
    def _predecessor_only(self):
        """Every stack runs its predecessor layers for the duration, whatever adapter is active."""
        state = self._routing_state()
        previous = state["predecessor_only"]
        state["predecessor_only"] = True
        try:
            yield
        finally:
            state["predecessor_only"] = previous

    # ------------------------------------------------------------------ forward
    def _before_model_forward(self, model: nn.Module, args, kwargs) -> None:
        successor = self.active_adapter_module
        state = self._routing_state()
        if successor is None or not model.training or state["predecessor_only"]:
            return
        config = self.peft_config[self.active_adapter]
        rate = replacing_rate(config, int(successor.optimizer_steps))
        if rate < 1.0 and replacing_steps(config) is None:
            _warn_once(successor, "no_phase_2", _NO_PHASE_2_WARNING)
        if distill.is_active(config, rate):  # first: the predecessor's forward must not see this forward's draws
            state["distill"] = self._gather_distillation(model, config, successor, args, kwargs)
        flat_draws = draw_replacements(
            config.seed,
            int(successor.training_forwards),
            rate,
            successor.num_modules,
            at_least_one=config.redraw_if_none_replaced,
        )
        successor.training_forwards += 1
        draws, start = [], 0
        for ranges in successor.modules_per_stack:
            draws.append(flat_draws[start : start + len(ranges)])
            start += len(ranges)
        successor.current_draws = draws
        if not any(flat_draws) and torch.is_grad_enabled() and not any(p.requires_grad for p in model.parameters()):
            # No successor layer runs and nothing else trains: the loss would not require grad and backward would
            # fail. The compressed stacks' outputs are made to require grad instead (see hooks.after_stack_hook); the
            # successor gets no gradient this step, like an unused parameter in the official code.
            state["grad_fallback"] = True

    def _after_model_forward(self, *_) -> None:
        state = self._routing_state()
        if state["predecessor_only"]:  # the predecessor's own forward inside a training forward
            return
        state["grad_fallback"] = False
        pending = state["distill"]
        if pending is not None:
            for handle in pending.handles:
                handle.remove()
        state["distill"] = None

    # ------------------------------------------------------------------ distillation
    def _gather_distillation(self, model: nn.Module, config, successor, args, kwargs) -> distill.PendingTerms:
        """The predecessor's logits and boundary hidden states for this batch, and hooks recording the training
        forward's own boundaries (see :mod:`.distill`)."""
        cache = self._routing_state()["teacher_logits"]
        wants_logits, wants_hidden = config.distill_logit_weight > 0, config.distill_hidden_weight > 0
        keys = distill.example_keys(kwargs) if wants_logits and not wants_hidden else None
        teacher_logits = teacher_boundaries = None
        if keys is not None and all(key in cache for key in keys):
            teacher_logits = torch.stack([cache[key] for key in keys])
        if wants_hidden or (wants_logits and teacher_logits is None):
            teacher_output, teacher_boundaries = self._predecessor_forward(
                model, successor, args, kwargs, wants_hidden
            )
            teacher_logits = teacher_output.logits if wants_logits else None
            if keys is not None and teacher_logits.dim() == 2:
                cache.update(zip(keys, teacher_logits.detach()))
        student_boundaries, handles = None, []
        if wants_hidden:
            layers = routing.predecessor_layers(model.get_submodule(successor.stack_paths[0]))
            ends = distill.module_ends(layers, successor.modules_per_stack[0])
            student_boundaries = [None] * len(ends)
            handles = distill.record_outputs(
                [[successor.stacks[0][index], end] for index, end in enumerate(ends)], student_boundaries
            )
        return distill.PendingTerms(
            teacher_logits=teacher_logits,
            teacher_boundaries=teacher_boundaries,
            student_boundaries=student_boundaries,
            handles=handles,
            labels=kwargs.get("labels"),
            attention_mask=kwargs.get("attention_mask"),
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            shifts_labels=_loss_shifts_labels(model),
        )

    def _predecessor_forward(self, model: nn.Module, successor, args, kwargs, record_boundaries: bool):
        """The predecessor alone (its layers and original head) on this batch: eval mode, no gradient."""
        inputs = {name: value for name, value in kwargs.items() if name not in distill.LOSS_ONLY_INPUTS}
        boundaries, handles = None, []
        if record_boundaries:
            layers = routing.predecessor_layers(model.get_submodule(successor.stack_paths[0]))
            ends = distill.module_ends(layers, successor.modules_per_stack[0])
            boundaries = [None] * len(ends)
            handles = distill.record_outputs([[end] for end in ends], boundaries)
        # PEFT's modules_to_save heads give back the original head too; enabling them again would also make every
        # active head trainable, so their requires_grad flags are put back as they were, like each module's mode.
        training = {module: module.training for module in model.modules()}
        trainable = {param: param.requires_grad for param in model.parameters()}
        self.disable_adapter_layers()
        model.eval()
        try:
            with self._predecessor_only(), torch.no_grad():
                output = model(*args, **inputs)
        finally:
            self.enable_adapter_layers()
            for module, mode in training.items():
                module.training = mode
            for param, requires_grad in trainable.items():
                param.requires_grad_(requires_grad)
            for handle in handles:
                handle.remove()
        return output, boundaries

    def _add_distillation_terms(self, model: nn.Module, args, output):
        state = self._routing_state()
        pending = state["distill"]
        if pending is None or state["predecessor_only"]:
            return None
        return distill.combine(self.peft_config[self.active_adapter], output, pending)

    def _plan(self, path: str, layers: routing.ReplaceableLayers) -> list[nn.Module]:
        """The blocks ``layers`` runs in this forward (see the module docstring)."""
        predecessor = routing.predecessor_layers(layers)
        successor = self.active_adapter_module
        if successor is None or path not in successor.stack_paths or self._routing_state()["predecessor_only"]:
            return predecessor
        stack_index = successor.stack_paths.index(path)
        successor_layers = list(successor.stacks[stack_index])
        for position, layer in enumerate(successor_layers):
            hooks.follow_predecessor_flags(layer, predecessor[position], layers.training)
        if not layers.training or successor.current_draws is None:
            return successor_layers
        plan = []
        draws = successor.current_draws[stack_index]
        for module, replaced, successor_layer in zip(
            successor.modules_per_stack[stack_index], draws, successor_layers
        ):
            plan.extend([successor_layer] if replaced else predecessor[module.start : module.stop])
        return plan

    # ------------------------------------------------------------------ schedule
    def replacing_rate(self, adapter_name: str | None = None) -> float:
        """The replacement probability p the next training forward of ``adapter_name`` (default: active) uses."""
        name = adapter_name or self.active_adapter
        successor = self.adapter_modules[name]
        return replacing_rate(self.peft_config[name], int(successor.optimizer_steps))

    def replacing_steps(self, adapter_name: str | None = None) -> int | None:
        """Optimizer steps of phase 1 of ``adapter_name`` (default: active), ``None`` while the end is unknown."""
        return replacing_steps(self.peft_config[adapter_name or self.active_adapter])

    @property
    def current_draws(self) -> list[list[bool]] | None:
        """Per stack, per module: whether the last training forward of the active adapter ran the successor."""
        successor = self.active_adapter_module
        return None if successor is None else successor.current_draws

    def _count_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(param) for group in optimizer.param_groups for param in group["params"]}
        for successor in self.adapter_modules.values():
            if any(id(param) in held for param in successor.parameters()):
                successor.optimizer_steps += 1

    # ------------------------------------------------------------------ unloading and extraction
    def _check_merge_allowed(self) -> None:
        # Nothing is merged into the predecessor's weights: extraction swaps whole layers, which every model allows.
        return

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        successor = self._adapter_to_extract(adapter_names) if merge else None
        if successor is not None:
            name = next(name for name, module in self.adapter_modules.items() if module is successor)
            steps, phase_1 = int(successor.optimizer_steps), replacing_steps(self.peft_config[name])
            if steps > 0 and (phase_1 is None or steps <= phase_1):
                warnings.warn(
                    f"merge_and_unload(): the successor took {steps} optimizer steps, all in phase 1 (mixed with "
                    "predecessor modules), and never trained alone, though it is what the compressed model runs. "
                    "Give the run a phase 2: train with transformers.Trainer and TheseusCallback (it plans both "
                    "phases from max_steps), or set TheseusConfig(total_steps=...) or steps_for_replacing below "
                    "the steps you train.",
                    UserWarning,
                    stacklevel=3,
                )
        self._detach()
        if successor is not None:
            for path, count_key, successor_layers in zip(
                successor.stack_paths, successor.layer_count_keys, successor.stacks
            ):
                self._put_in_place(path, count_key, successor_layers, cut_per_layer_lists=len(successor.stacks) == 1)
        # PEFT's own pass swaps modules_to_save wrappers for the trained (merge) or original (unload) module.
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _adapter_to_extract(self, adapter_names: list[str] | None) -> TheseusSuccessor:
        names = adapter_names or ([self.active_adapter] if isinstance(self.active_adapter, str) else [])
        if len(names) != 1 or names[0] not in self.adapter_modules:
            raise ValueError(
                f"merge_and_unload() extracts the successor of exactly one Theseus adapter; got {names}, available "
                f"{list(self.adapter_modules)}. Pass `adapter_names=[name]` or `set_adapter(name)` first."
            )
        return self.adapter_modules[names[0]]

    def _detach(self) -> None:
        """Remove every hook and give the predecessor's layer lists back, as they were."""
        state = self._routing_state()
        for handle in state["handles"]:
            handle.remove()
        self._after_model_forward()
        for layers in state["stacks"].values():
            routing.restore_plain(layers)
        state["stacks"].clear()
        state["handles"].clear()

    def _put_in_place(
        self, path: str, count_key: str, successor_layers: nn.ModuleList, cut_per_layer_lists: bool
    ) -> None:
        """Replace the predecessor's stack at ``path`` by the successor layers and make the config say so.

        Per-layer config lists (``layer_types``) describe the only stack of a decoder-only model; they are cut to the
        first n_s entries, which describe the successor layers (successor layer i is structurally layer i).
        """
        owner_path, _, attribute = path.rpartition(".")
        owner = self.model.get_submodule(owner_path)
        predecessor = routing.predecessor_layers(getattr(owner, attribute))
        new_layers = nn.ModuleList(list(successor_layers)).train(owner.training)
        for position, layer in enumerate(new_layers):
            routing.set_layer_index(layer, routing.layer_index_of(predecessor[position]))
        setattr(owner, attribute, new_layers)

        old_depth, new_depth = len(predecessor), len(new_layers)
        config = self.model.config
        setattr(config, count_key, new_depth)
        for key in PER_LAYER_CONFIG_KEYS:
            values = getattr(config, key, None)
            if cut_per_layer_lists and isinstance(values, (list, tuple)) and len(values) == old_depth:
                setattr(config, key, type(values)(values[:new_depth]))
        # T5-style stacks keep their own copy of the config; keep its depth in step for in-memory use.
        stack_config = getattr(owner, "config", None)
        if stack_config is not None and stack_config is not config:
            for key in LAYER_COUNT_KEYS:
                real_key = stack_config.attribute_map.get(key, key)
                if getattr(stack_config, real_key, None) == old_depth:
                    setattr(stack_config, real_key, new_depth)


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss is a causal-LM loss (the Trainer's rule for counting ``num_items_in_batch``)."""
    loss_type = getattr(model, "loss_type", None)
    is_causal = LOSS_MAPPING.get(loss_type) is ForCausalLMLoss
    return is_causal and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)


_NO_PHASE_2_WARNING = (
    "Theseus does not know when phase 1 ends: TheseusConfig has neither total_steps nor steps_for_replacing, and no "
    "TheseusCallback set them from a Trainer. p stays at replacing_rate, so the successor never trains alone. Train "
    "with transformers.Trainer and TheseusCallback, or set total_steps (the optimizer steps you plan) or "
    "steps_for_replacing."
)


def _warn_once(successor: nn.Module, key: str, message: str) -> None:
    warned = successor.__dict__.setdefault("_theseus_warned", set())
    if key not in warned:
        warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=2)
