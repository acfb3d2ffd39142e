"""PEFT plumbing shared by tuners whose adapter is one whole module kept beside the base model.

LoRA-style tuners wrap individual layers inside the base model. Ladder side-tuning (a side network) and Theseus
(successor layers) instead own one module per adapter that does not live inside the base model. PEFT 0.21 supports
that through "shared state" on the tuner, with several traps; this module handles them once:

* the per-adapter modules sit in an ``nn.ModuleDict`` on a :class:`AdapterModules` container, a ``BaseTunerLayer``,
  so PEFT's state-dict selection, ``print_trainable_parameters`` and layer-status tools find them structurally;
* checkpoint keys drop the adapter name (``<container>.<attr>.<name>.x`` -> ``<container>.<attr>.x``), so an adapter
  saved as "default" loads under any other name;
* weights are kept in fp32 by default (PEFT's ``autocast_adapter_dtype``), whatever the backbone's dtype;
* ``inference_mode`` adapters (``PeftModel.from_pretrained(..., is_trainable=False)``) are frozen;
* ``set_adapter``, ``delete_adapter`` and enabling/disabling act on the container, not on base-model layers.

Subclasses provide :meth:`ModuleTuner._build_adapter_module` (validate and build, never touching the model) and
:meth:`ModuleTuner._attach` (install whatever routes the model's forward through the active adapter).
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import set_additional_trainable_modules
from torch import nn

from .backbone import inspect_backbone
from .quantization.inspection import is_quantized_module, quantization_info


class AdapterModules(nn.Module, BaseTunerLayer):
    """Holds one module per adapter name under the attribute ``attribute_name`` (an ``nn.ModuleDict``)."""

    def __init__(self, attribute_name: str) -> None:
        nn.Module.__init__(self)
        self.adapter_layer_names = (attribute_name,)
        self.merged_adapters = []
        self._active_adapter = []
        setattr(self, attribute_name, nn.ModuleDict())

    @property
    def modules_by_adapter(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT calls this after a low_cpu_mem_usage load; there is no base layer to follow (BaseTunerLayer's lookup
        # would recurse), and the loaded tensors already sit on the device PEFT loaded them to.
        return None

    def set_requires_grad_for(self, active: list[str], inference_mode: bool) -> None:
        for name, module in self.modules_by_adapter.items():
            module.requires_grad_(name in active and not inference_mode)


class ModuleTuner(BaseTuner):
    """Base tuner for methods whose adapter is one module per adapter name (see the module docstring).

    Subclasses set ``prefix`` (``"<method>_"``) and ``adapter_attribute`` (a name containing the prefix, so that PEFT's
    prefix-based checks find the parameters), and implement ``_build_adapter_module`` and ``_attach``.
    """

    uses_shared_state = True
    tuner_layer_cls = AdapterModules
    target_module_mapping: dict[str, list[str]] = {}
    adapter_attribute: str
    # Name of the container submodule on the tuner; checkpoint keys start with it.
    container_name = "adapters"
    # Hub tags of the method, added to every model card we write (see ``_hub.py``).
    card_tags: tuple[str, ...] = ()
    # Whether adapter weights follow PEFT's fp32 upcast (``autocast_adapter_dtype``). A tuner whose adapter modules
    # replace base-model layers in the same forward (Theseus) keeps the base model's dtype instead.
    upcast_adapter_weights = True

    # ------------------------------------------------------------------ to implement
    def _build_adapter_module(self, model: nn.Module, config, adapter_name: str) -> nn.Module:
        """Validate ``config`` against ``model`` and build the adapter's module. Must not modify ``model``."""
        raise NotImplementedError

    def _attach(self, model: nn.Module, adapter_name: str) -> None:
        """Route ``model``'s forward through the active adapter (hooks, swapped stacks). Called after each inject."""
        raise NotImplementedError

    def _active_module_changed(self) -> None:
        """Called after every change of :attr:`active_adapter_module`: inject, set, delete, enable or disable.

        Every PEFT path that changes the active adapter goes through one of those methods of this class, so a
        subclass may hand the active module to its forward path here instead of looking it up at every call.
        """

    # ------------------------------------------------------------------ PEFT hooks
    @property
    def adapter_container(self) -> AdapterModules:
        if self.container_name not in self._modules:
            self._modules[self.container_name] = AdapterModules(self.adapter_attribute)
        return self._modules[self.container_name]

    @property
    def adapter_modules(self) -> nn.ModuleDict:
        """The per-adapter modules, keyed by adapter name."""
        return self.adapter_container.modules_by_adapter

    def _create_and_replace(self, *args, **kwargs):  # never called: we override inject_adapter
        raise NotImplementedError(f"{type(self).__name__} does not replace individual modules.")

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        # Build first: every validation error is raised here, before the model or the tuner changes.
        check_not_sharded(model)
        if hasattr(config, "check_fields"):  # fields may have been set after the config was built
            config.check_fields()
        _check_modules_to_save_exist(model, config)
        _check_heads_trainable(model, config.modules_to_save or [])
        module = self._build_adapter_module(model, config, adapter_name)
        is_first_adapter = len(self.adapter_modules) == 0
        if autocast_adapter_dtype and self.upcast_adapter_weights:
            _upcast_half_floats(module)
        self.adapter_modules[adapter_name] = module
        if is_first_adapter:
            model.requires_grad_(False)
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )
        # The container reports the active adapter to PEFT's get_layer_status / get_model_status.
        self.adapter_container._active_adapter = [
            name for name in self.active_adapters if name in self.adapter_modules
        ]
        self.adapter_container.set_requires_grad_for(self.active_adapters, config.inference_mode)
        self._attach(model, adapter_name)
        self._active_module_changed()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(False)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        if autocast_adapter_dtype and self.upcast_adapter_weights and adapter_name in self.adapter_modules:
            _upcast_half_floats(self.adapter_modules[adapter_name])

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [name for name in names if name not in self.adapter_modules]
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found; available: {list(self.adapter_modules)}.")
        if len(names) > 1:
            raise ValueError(f"{type(self).__name__} runs one adapter at a time; got {names}.")
        super().set_adapter(names, inference_mode=inference_mode)  # modules_to_save wrappers
        self.active_adapter = names[0]
        self.adapter_container._active_adapter = names
        self.adapter_container.set_requires_grad_for(names, inference_mode)
        self._active_module_changed()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        super().delete_adapter(adapter_name)  # peft_config and modules_to_save wrappers
        del self.adapter_modules[adapter_name]
        remaining = list(self.adapter_modules)
        self.active_adapter = remaining[0] if remaining else []
        self.adapter_container._active_adapter = remaining[:1]
        self._active_module_changed()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)  # also toggles the modules_to_save heads
        self.adapter_container._disable_adapters = not enabled
        self._active_module_changed()

    @property
    def adapters_enabled(self) -> bool:
        return not self.adapter_container._disable_adapters

    @property
    def active_adapter_module(self) -> nn.Module | None:
        """The module of the active adapter, or ``None`` when adapters are disabled or none exists."""
        name = self.active_adapter if isinstance(self.active_adapter, str) else None
        if not self.adapters_enabled or name not in self.adapter_modules:
            return None
        return self.adapter_modules[name]

    # ------------------------------------------------------------------ FSDP
    def fsdp_units(self, adapter_blocks: bool = True) -> list[nn.Module]:
        """The modules to shard one by one with ``torch.distributed.fsdp.fully_shard``, in this order, before the
        ``PeftModel`` itself (the root unit).

        Every block of the backbone's layer stacks, then, with ``adapter_blocks=True``, every block of every adapter
        (LST side blocks, Theseus successor layers), each its own unit, as a policy that wraps by block class gives.
        With ``adapter_blocks=False`` the adapter's blocks stay in the root unit, with the rest of the adapter, the
        embeddings and the head.

        Raises ``ValueError`` before anything is sharded if FSDP cannot shard this model: it is sharded already, or
        its layer stacks hold quantized weights.
        """
        check_not_sharded(self.model)
        blocks = self._backbone_blocks()
        _check_shardable_weights(self.model, blocks)
        if adapter_blocks:
            blocks += [block for module in self.adapter_modules.values() for block in self._adapter_blocks(module)]
        return blocks

    def _backbone_blocks(self) -> list[nn.Module]:
        """Every block of the layer stacks the adapters use, stack by stack."""
        blocks, seen = [], set()
        for config in self.peft_config.values():
            for stack in inspect_backbone(self.model, getattr(config, "layers_path", None)).stacks:
                for block in stack.layers._modules.values():  # the list's own blocks, whatever routing is set
                    if id(block) not in seen:
                        seen.add(id(block))
                        blocks.append(block)
        return blocks

    def _adapter_blocks(self, module: nn.Module) -> list[nn.Module]:
        """The blocks inside one adapter's module (here: instances of the backbone's block classes)."""
        block_classes = tuple({type(block) for block in self._backbone_blocks()})
        return [child for child in module.modules() if isinstance(child, block_classes)]

    def merge_and_unload(self, *args, **kwargs):
        if any(is_fsdp_module(module) for module in self.modules()):
            raise ValueError(
                "merge_and_unload() needs the whole model, but this one is sharded with FSDP. Gather the trainable "
                "state onto rank 0 (get_model_state_dict with StateDictOptions(full_state_dict=True, "
                "cpu_offload=True, ignore_frozen_params=True), on every rank), then on rank 0 load it into an "
                "unsharded copy (get_peft_model on a fresh base, load_state_dict(state_dict, strict=False)) and "
                "call merge_and_unload() there."
            )
        return super().merge_and_unload(*args, **kwargs)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        sharded = next((key for key, value in selected.items() if is_dtensor(value)), None)
        if sharded is not None:
            raise ValueError(
                f"The adapter's weights are FSDP shards ({sharded} is a DTensor): saving them as they are would write "
                "this rank's pieces only. Gather them onto rank 0 (on every rank), then save from rank 0 alone:\n"
                "    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict\n"
                "    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)\n"
                "    state_dict = get_model_state_dict(peft_model, options=options)\n"
                "    if torch.distributed.get_rank() == 0:\n"
                "        peft_model.save_pretrained(path, state_dict=state_dict)"
            )
        return selected

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # "...adapters.ladder_side_net.<name>.x" -> "...adapters.ladder_side_net.x"; keys of modules_to_save
        # wrappers go through PEFT's own rule.
        own = f".{cls.adapter_attribute}.{adapter_name}."
        if own in key:
            return key.replace(own, f".{cls.adapter_attribute}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


# Head names PEFT's task-type wrappers add to modules_to_save themselves, whether or not the model has them
# (PeftModelForSequenceClassification adds both "classifier" and "score").
TASK_HEAD_NAMES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _check_modules_to_save_exist(model: nn.Module, config) -> None:
    """Every ``modules_to_save`` name must name a module of ``model``, by PEFT's rule (the end of its dotted name).

    Otherwise PEFT trains and saves nothing for it, silently.
    """
    task_type = getattr(config.task_type, "value", config.task_type)
    added_by_peft = TASK_HEAD_NAMES.get(task_type, ())
    names = [name for name, _ in model.named_modules() if name]
    missing = [
        key
        for key in config.modules_to_save or []
        if key not in added_by_peft and not any(name.endswith(key) for name in names)
    ]
    if missing:
        top_level = [name for name, _ in model.named_children()]
        raise ValueError(
            f"modules_to_save names {missing}, which match no module of {type(model).__name__}. Name each by its "
            f"attribute name or the end of its dotted path (e.g. 'classifier', 'score', 'lm_head'); the model's "
            f"top-level modules are {top_level}. The model is unchanged."
        )


def _check_heads_trainable(model: nn.Module, modules_to_save: list[str]) -> None:
    """A ``modules_to_save`` head must hold float weights: PEFT trains a copy of it.

    A model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` has its classification head quantized too (only
    ``lm_head`` is skipped by default), and PEFT's copy then fails deep inside bitsandbytes with "only Tensors of
    floating point dtype can require gradients".
    """
    for name, module in model.named_modules():
        if not any(name == key or name.endswith("." + key) for key in modules_to_save):
            continue
        quantized = [p_name for p_name, param in module.named_parameters() if not param.dtype.is_floating_point]
        if quantized:
            short_name = name.rsplit(".", 1)[-1]
            raise ValueError(
                f"Module {name!r} is in modules_to_save (it is trained) but its weights are quantized "
                f"({quantized[0]} is {module.get_parameter(quantized[0]).dtype}). Keep trained heads in full "
                f"precision: load with BitsAndBytesConfig(..., llm_int8_skip_modules=[{short_name!r}]) "
                "(peft_ladder.quantize never converts heads). The model is unchanged."
            )


def _upcast_half_floats(module: nn.Module) -> None:
    """fp16/bf16 parameters to fp32 in place (PEFT's convention for trainable adapter weights)."""
    for param in module.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


# ---------------------------------------------------------------------- FSDP
def is_dtensor(value) -> bool:
    """Whether ``value`` is a ``DTensor``: under ``fully_shard``, a parameter outside its unit's forward."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was called on ``module`` (it is an FSDP unit, or the first module of one)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check_not_sharded(model: nn.Module) -> None:
    """Refuse a model that ``fully_shard`` has sharded: adapters are built, loaded and planned on the whole model."""
    name = next((name for name, module in model.named_modules() if is_fsdp_module(module)), None)
    if name is not None:
        raise ValueError(
            f"This {type(model).__name__} is already sharded with FSDP (fully_shard was called on "
            f"'{name or type(model).__name__}'): its weights are DTensor shards, which an adapter cannot be built "
            "from or loaded into. Create or load the adapter on the unsharded model (get_peft_model, "
            "PeftModel.from_pretrained), then shard the PeftModel (`peft_model.fsdp_units()`, then the PeftModel)."
        )


def _check_shardable_weights(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Refuse a backbone with quantized weights in its layer stacks, which FSDP cannot shard."""
    info = quantization_info(model)
    found = next(
        (
            f"{type(block).__name__}.{name}"
            for block in blocks
            for name, m in block.named_modules()
            if is_quantized_module(m)
        ),
        None,
    )
    loaded_quantized = getattr(getattr(model, "config", None), "quantization_config", None) is not None
    if found is None and not loaded_quantized and (info is None or info.backend == "cast"):
        return
    what = f"{info.scheme!r} with {info.backend}" if info is not None and info.backend != "cast" else found
    raise ValueError(
        f"FSDP cannot shard this quantized backbone ({what or 'config.quantization_config'}): torchao and NF4 weights "
        "fail inside fully_shard, and quantize_dynamic's packed int8 weights are not parameters, so every rank would "
        "hold all of them. Shard the float backbone instead (a bf16 cast, peft_ladder.quantize(model, 'bf16'), shards "
        "like fp32), or keep the quantized backbone and train with DDP, where every rank holds the whole quantized "
        "backbone (which is what quantizing it is for)."
    )
