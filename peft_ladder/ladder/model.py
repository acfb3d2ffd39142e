"""The Ladder Side-Tuning tuner: validates, builds and initialises side networks, and routes the model through them.

``get_peft_model(model, LadderSideConfig(...))`` arrives here (PEFT's ``BaseTuner`` machinery). Per adapter we:

1. inspect the backbone (:func:`peft_ladder.inspect_backbone`) and check the request against it: task type, layer
   indices, reduction factor, and for a loaded adapter the backbone shape it was trained on. Every check runs before
   anything changes, so a failed call leaves the model as it was;
2. build a :class:`~.side_network.LadderSideNetwork`: per backbone stack, side blocks of the backbone's own class at
   1/r width (:mod:`.shapes`, :mod:`.families`), falling back to a generic pre-norm block where the family's block
   cannot be built;
3. initialise it by pruning the backbone (:mod:`.init`), unless the adapter is being loaded from a checkpoint;
4. install the forward overrides once per model (:mod:`.router`). The active adapter's side network is looked up at
   every call, so ``set_adapter``, ``disable_adapter`` and ``delete_adapter`` need no re-wiring.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from peft.utils import TaskType
from torch import nn
from transformers.models.auto import modeling_auto

from .._tuner import ModuleTuner
from ..backbone import BackboneInfo, UnsupportedModelError, float_reference, inspect_backbone, probe_inputs
from .init import pruned_init_, trace_block_steps
from .router import LadderRouter, compiled_side_call, supports_chunked_loss
from .side_builder import StackPlan, build_side_network, check_finite, plan_stacks
from .side_network import LadderSideNetwork

# Which model classes can serve which task type (class names from transformers' auto mappings).
_TASK_CLASSES = {
    TaskType.CAUSAL_LM: modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    TaskType.SEQ_2_SEQ_LM: modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    TaskType.SEQ_CLS: modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    TaskType.TOKEN_CLS: modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
}
_AUTO_CLASS_FOR_TASK = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
}
MERGE_ERROR = (
    "A ladder side network cannot be merged into the backbone: it is a separate network, not a weight delta. Keep "
    "the PeftModel for inference, or call `model.unload()` to get the clean base model back (without the side "
    "network)."
)


class LadderSideModel(ModuleTuner):
    """PEFT tuner for Ladder Side-Tuning. Created by ``get_peft_model`` from a :class:`LadderSideConfig`.

    The side networks live in ``self.adapters.ladder_side_modules[adapter_name]`` (saved as the adapter's weights);
    the base model is frozen and only ever runs forward.
    """

    prefix = "ladder_side_"
    adapter_attribute = "ladder_side_modules"
    card_tags = ("ladder-side-tuning",)  # model card tags (peft_ladder._hub adds "peft" and the usage snippet)

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._router: LadderRouter | None = None
        self._plans: list[StackPlan] | None = None
        self._block_steps = None
        self._low_cpu_mem_usage = low_cpu_mem_usage
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------ building
    def inject_adapter(
        self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None
    ):
        self._low_cpu_mem_usage = low_cpu_mem_usage
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)

    def _build_adapter_module(self, model: nn.Module, config, adapter_name: str) -> nn.Module:
        info = inspect_backbone(model, config.layers_path)
        _check_task_type(model, config.task_type)
        _check_layer_kinds(model)
        config.check_loaded_against(_shape_record(info), getattr(model, "name_or_path", None))
        plans = self._plans or plan_stacks(model, info)
        if [id(plan.layers) for plan in plans] != [id(stack.layers) for stack in info.stacks]:
            raise ValueError(
                "All Ladder side-tuning adapters on one model must tap the same layer stacks; this adapter's "
                f"layers_path={config.layers_path!r} names others than the first adapter's. Use the same layers_path."
            )
        tapped = _tapped_layers(config, info)
        network = self._new_side_network(model, config, info, plans, tapped, config.side_block)
        if not _is_empty(network):
            network = self._first_forward_or_fallback(model, config, info, plans, tapped, network)
        if config.compile_side:  # after the probe forward above, which then ran eager (and compiled nothing)
            _set_compile_options(network, {})
        if network.stacks and all(stack.generic_blocks for stack in network.stacks):
            # A fallback (at build time or at the first forward) is recorded, so that the saved config names the
            # blocks its weights belong to: a reload whose first forward succeeds would otherwise build the family's
            # blocks and load none of the weights into them.
            config.side_block = "generic"
        config.backbone_shape = _shape_record(info)
        self._plans = plans
        return network

    def _new_side_network(self, model, config, info, plans, tapped, side_block: str) -> LadderSideNetwork:
        """Build, place and initialise one side network; nothing outside it changes."""
        # low_cpu_mem_usage loading builds on the meta device (our flag, or PEFT's init_empty_weights around us)
        build_context = _empty_weights() if self._low_cpu_mem_usage else contextlib.nullcontext()
        with build_context:
            network = build_side_network(model, config, info, plans, tapped, side_block)
        if _is_empty(network):
            return network
        reference = float_reference(model)
        network.to(device=reference.device, dtype=reference.dtype)
        network.train(model.training)  # new modules start in training mode; follow the model's
        loading = getattr(config, "_ladder_loaded_from_checkpoint", False)
        if config.init != "random" and not loading:
            if self._block_steps is None:
                self._block_steps = self._trace(model, plans)
            pruned_init_(
                network,
                plans,
                self._block_steps,
                model,
                info,
                pruning_strategy=config.pruning,
                ladder_init=config.ladder_init,
            )
        check_finite(network)
        return network

    def _first_forward_or_fallback(self, model, config, info, plans, tapped, network) -> LadderSideNetwork:
        """Run one tiny forward through ``network``; if the family's blocks cannot run at side width, rebuild with
        the generic block (with a warning) and try again; if that fails too, refuse. Never hand out a model whose
        forward raises."""
        try:
            self._probe_forward(model, plans, network)
            return network
        except Exception as error:
            if all(stack.generic_blocks for stack in network.stacks):
                raise UnsupportedModelError(
                    f"Ladder side-tuning cannot run a side network on {type(model).__name__}: a forward through "
                    f"generic side blocks raised {type(error).__name__}: {error}. Pass `layers_path=...` if the "
                    "wrong module list was taken as the layer stack."
                ) from error
            warnings.warn(
                f"{plans[0].block_class.__name__} cannot run at side width ({type(error).__name__}: {error}); "
                "using the generic pre-norm side block instead (side_block='generic').",
                stacklevel=5,
            )
        network = self._new_side_network(model, config, info, plans, tapped, "generic")
        return self._first_forward_or_fallback(model, config, info, plans, tapped, network)

    @torch.no_grad()
    def _probe_forward(self, model, plans, network) -> None:
        if self._router is not None:  # a second adapter: the router is installed; point it at the new network
            router, previous = self._router, self._router.side
        else:
            router, previous = LadderRouter(model, plans, chunked_loss=False), None
            router.install()
        router.side = network
        was_training = model.training
        model.eval()
        try:
            model(**probe_inputs(model))
        finally:
            model.train(was_training)
            router.side = previous
            if router is not self._router:
                router.remove()

    # ------------------------------------------------------------------ re-initialisation
    @torch.no_grad()
    def reinitialize_side_network(self, adapter_name: str | None = None, importance: dict | None = None) -> None:
        """Prune the backbone into adapter ``adapter_name``'s side network again (default: the active adapter).

        Overwrites the side blocks, ladders, stream input and side final norm in place, as at creation
        (:mod:`peft_ladder.ladder.init`). ``importance`` maps each backbone parameter to a score tensor of its
        shape (``{id(parameter): scores}``, e.g. squared gradients); ``None`` scores by weight magnitude.
        """
        name = adapter_name or self.active_adapter
        if name not in self.adapter_modules:
            raise ValueError(f"No Ladder side-tuning adapter named {name!r}; adapters: {list(self.adapter_modules)}.")
        if self._block_steps is None:
            self._block_steps = self._trace(self.model, self._plans)
        config = self.peft_config[name]
        pruned_init_(
            self.adapter_modules[name],
            self._plans,
            self._block_steps,
            self.model,
            inspect_backbone(self.model, config.layers_path),
            importance=importance,
            pruning_strategy=config.pruning,
            ladder_init=config.ladder_init,
        )

    @contextlib.contextmanager
    def backbone_only(self):
        """Run the plain backbone inside this context, as if no adapter were attached (gradients flow as usual)."""
        router = self._router.bypassed() if self._router is not None else contextlib.nullcontext()
        with router:
            yield

    def _trace(self, model, plans: list[StackPlan]):
        """Forward order of the backbone's block modules, for the pruning chain (one tiny forward, no grad)."""
        with self.backbone_only():
            return trace_block_steps(model, [plan.layers for plan in plans], probe_inputs(model))

    def _attach(self, model: nn.Module, adapter_name: str) -> None:
        if self._router is None:
            chunked = self.peft_config[adapter_name].task_type == TaskType.CAUSAL_LM and supports_chunked_loss(model)
            self._router = LadderRouter(model, self._plans, chunked_loss=chunked)
            self._router.install()

    def _active_module_changed(self) -> None:
        if self._router is not None:
            self._router.side = self.active_adapter_module

    # ------------------------------------------------------------------ PEFT semantics
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """fp32 side weights by default (PEFT's ``autocast_adapter_dtype=True``); with ``False``, the backbone's
        dtype (the side network then computes in it without autocast)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype and adapter_name in self.adapter_modules:
            dtype = float_reference(self.model).dtype
            self.adapter_modules[adapter_name].to(dtype=dtype)

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(MERGE_ERROR)

    def merge_adapter(self, *args, **kwargs):
        raise NotImplementedError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise NotImplementedError(MERGE_ERROR)
        if self._router is not None:
            self._router.remove()
            self._router = None
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar, adapter_names=adapter_names)

    @property
    def stack_plans(self) -> list[StackPlan]:
        """Where each backbone layer stack sits (body, layers, final norm), as the side networks use them."""
        return list(self._plans or [])

    @property
    def side_network(self) -> LadderSideNetwork | None:
        """The active adapter's side network (``None`` while adapters are disabled)."""
        return self.active_adapter_module

    def _adapter_blocks(self, module: LadderSideNetwork) -> list[nn.Module]:
        # every side block, whether of the backbone's class or the generic fallback (see ModuleTuner.fsdp_units)
        return [block for stack in module.stacks for block in stack.blocks]


# ---------------------------------------------------------------------- validation
def _check_task_type(model: nn.Module, task_type) -> None:
    if task_type is None or task_type not in _TASK_CLASSES:
        return
    class_name = type(model).__name__
    if class_name not in set(_TASK_CLASSES[task_type].values()):
        raise ValueError(
            f"task_type={task_type} needs a model with that head, but got {class_name}. Load the model with "
            f"`transformers.{_AUTO_CLASS_FOR_TASK[task_type]}.from_pretrained(...)`, or use the task type that "
            f"matches {class_name} (FEATURE_EXTRACTION for a bare backbone)."
        )


# Per-layer kinds (``config.layer_types``, Jamba-style ``layers_block_type``) whose blocks keep a KV cache the side
# network can run beside. Linear-attention, convolution and state-space layers keep a recurrent state instead.
ATTENTION_LAYER_KINDS = ("full_attention", "sliding_attention", "chunked_attention", "attention")


def _check_layer_kinds(model: nn.Module) -> None:
    config = model.config
    kinds = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or []
    other = sorted({kind for kind in kinds if kind not in ATTENTION_LAYER_KINDS})
    if other:
        raise UnsupportedModelError(
            f"Ladder side-tuning does not support {type(model).__name__} (model_type '{config.model_type}') yet: its "
            f"layer stack mixes attention with {', '.join(other)} layers, which carry a recurrent state that the side "
            "network cannot extend beside its own blocks. No LadderSideConfig option works around this "
            "(side_block='generic' and layers_path fail the same way). Compressing the model with TheseusConfig "
            "works on these stacks."
        )


def _shape_record(info: BackboneInfo) -> dict:
    return {
        "model_type": info.model_type,
        "hidden_size": info.hidden_size,
        "num_layers": [s.num_layers for s in info.stacks],
    }


def _tapped_layers(config, info: BackboneInfo) -> list[list[int]]:
    per_stack = []
    for stack in info.stacks:
        if config.side_layers is None:
            per_stack.append(list(range(stack.num_layers)))
            continue
        bad = [i for i in config.side_layers if not 0 <= i < stack.num_layers]
        if bad:
            raise ValueError(
                f"side_layers {bad} are out of range for the stack '{stack.path}' of {info.model_class}, which has "
                f"{stack.num_layers} layers (valid indices 0..{stack.num_layers - 1}). For encoder-decoder models the "
                "same indices apply to both stacks."
            )
        per_stack.append(list(config.side_layers))
    return per_stack


def _is_empty(network: nn.Module) -> bool:
    return any(p.is_meta for p in network.parameters())


@contextlib.contextmanager
def _empty_weights():
    from accelerate import init_empty_weights

    with init_empty_weights():
        yield


def compile_side_network(peft_model, **compile_kwargs) -> None:
    """Run each side stack of every adapter as one ``torch.compile`` graph: ladders, gates, side blocks, final norm.

    In place: the modules, weights and checkpoint keys are unchanged (``save_pretrained`` writes the same adapter),
    and the graph is compiled at the first call it serves. Calls without a KV cache use it: training, and forwards
    with ``use_cache=False`` or of encoders. Calls with one (``generate()``) run the side network eager, so
    generation compiles nothing per layer or per token. A seq2seq model compiles its side encoder and side decoder
    as two graphs.

    Keyword arguments go to ``torch.compile``: ``backend=`` (default ``"inductor"``), ``mode=``, ``dynamic=``,
    ``fullgraph=``, ``options=``. ``mode="reduce-overhead"`` replays the graph as CUDA graphs, against the launch
    overhead of many small side blocks at small batch sizes (CUDA only; a loop that keeps one call's outputs past
    the next call marks its steps with ``torch.compiler.cudagraph_mark_step_begin()``). ``dynamic=None`` (the
    default) compiles for the first input shapes and once more, shape-generic, when they first change;
    ``dynamic=True`` compiles shape-generic at once (batch size 1, on which the compiler always specialises,
    compiles its own graph in both); ``dynamic=False`` compiles once per shape.
    Stacks of one structure (adapters of one config, a deep copy of the model) share their graphs. All graphs count
    against one ``torch._dynamo.config.recompile_limit`` (8 by default; beyond it the side network runs eager): each
    new combination of stack structure, shapes, train/eval mode and grad mode is one. ``compile_side=True`` in the
    config is this call with no keyword arguments.

    Raises ``TypeError`` for a keyword ``torch.compile`` does not take, and ``torch.compile``'s own error for a bad
    ``mode``, ``backend`` or ``options``, before anything changes.
    """
    tuner = getattr(peft_model, "base_model", peft_model)
    if not isinstance(tuner, LadderSideModel):
        raise TypeError(f"compile_side_network needs a Ladder side-tuning PeftModel, got {type(peft_model).__name__}.")
    accepted = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(set(compile_kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"compile_side_network got {', '.join(unknown)}, which torch.compile does not take; it takes "
            f"{', '.join(accepted)}."
        )
    compiled_side_call(compile_kwargs)  # builds the torch.compile wrapper: a bad mode or backend raises here
    for network in tuner.adapter_modules.values():
        _set_compile_options(network, compile_kwargs)


def _set_compile_options(network: LadderSideNetwork, options: dict) -> None:
    for stack in network.stacks:
        stack.compile_options = dict(options)
