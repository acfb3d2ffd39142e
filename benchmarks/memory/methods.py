"""The training methods the benchmark compares, each a recipe that turns a freshly built model into a trainable one.

Only the public API is used: ``peft`` for LoRA, ``peft_ladder`` for LST, Theseus and quantization. A method whose
backend is missing on the current device (no CUDA for nf4, a ``peft_ladder`` feature not built yet) is reported as
skipped with the reason, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, TaskType, get_peft_model

import peft_ladder
from peft_ladder.ladder import chunked_causal_lm_loss

from .presets import ModelSpec

LORA_RANK = 32  # PEFT's method-comparison baseline: LoRA r=32 on q_proj and v_proj
LST_REDUCTION = 8


class MethodUnavailable(RuntimeError):
    """The method cannot run here (missing backend or feature); the message says why and how to get it."""


def _task_type(spec: ModelSpec) -> TaskType:
    return TaskType.CAUSAL_LM if spec.is_decoder else TaskType.SEQ_CLS


def _lora(model, spec: ModelSpec):
    # target_modules=None lets PEFT pick its per-family default: q_proj,v_proj for Llama, query,value for BERT.
    return get_peft_model(model, LoraConfig(task_type=_task_type(spec), r=LORA_RANK, lora_alpha=2 * LORA_RANK))


def _lora_checkpointed(model, spec: ModelSpec):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _lora(model, spec)


def _full(model, spec: ModelSpec):
    model.requires_grad_(True)
    return model


def _lst_config(spec: ModelSpec, **extra):
    return peft_ladder.LadderSideConfig(task_type=_task_type(spec), reduction_factor=LST_REDUCTION, **extra)


def _lst(model, spec: ModelSpec):
    return get_peft_model(model, _lst_config(spec))


def _lst_dropped(model, spec: ModelSpec):
    # Layer dropping: ladders and side blocks on every other backbone layer only (half the side network).
    num_layers = peft_ladder.inspect_backbone(model).num_layers
    return get_peft_model(model, _lst_config(spec, side_layers=list(range(1, num_layers, 2))))


def _lst_compiled(model, spec: ModelSpec):
    # compile_side=True: each side stack one torch.compile graph with torch.compile's defaults (inductor)
    return get_peft_model(model, _lst_config(spec, compile_side=True))


def _lst_cudagraphs(model, spec: ModelSpec):
    # the same graphs, replayed as CUDA graphs: against the launch overhead of the small side blocks
    peft_model = get_peft_model(model, _lst_config(spec))
    peft_ladder.compile_side_network(peft_model, mode="reduce-overhead")
    return peft_model


def _needs_cuda(device: str) -> str | None:
    return None if device.startswith("cuda") else "CUDA graphs (mode='reduce-overhead') need a CUDA device"


def _quantize(model, scheme: str):
    """The backbone's layer-stack linears quantized by ``peft_ladder.quantize`` (bitsandbytes or torchao nf4, torchao
    int8: whichever backend the device has)."""
    try:
        return peft_ladder.quantize(model, scheme)
    except peft_ladder.SchemeUnavailableError as error:
        raise MethodUnavailable(str(error)) from error


def _qlora(model, spec: ModelSpec):
    return _lora(_quantize(model, "nf4"), spec)


def _lst_int8(model, spec: ModelSpec):
    return get_peft_model(_quantize(model, "int8"), _lst_config(spec))


def _lst_nf4(model, spec: ModelSpec):
    return get_peft_model(_quantize(model, "nf4"), _lst_config(spec))


def _theseus(model, spec: ModelSpec):
    layers = peft_ladder.inspect_backbone(model).num_layers
    if layers < 2:
        raise MethodUnavailable(f"Theseus needs at least 2 layers to compress; the model has {layers}")
    config = peft_ladder.TheseusConfig(
        task_type=_task_type(spec), num_successor_layers=max(1, layers // 2), replacing_rate=0.5
    )
    return get_peft_model(model, config)


@dataclass(frozen=True)
class Method:
    """One benchmarked training recipe."""

    name: str
    description: str
    prepare: Callable  # (model, spec) -> trainable model; raises MethodUnavailable when it cannot run here
    unavailable: Callable[[str], str | None] = lambda device: None  # device -> reason it cannot run, or None
    chunked_loss: bool = False  # the LM loss as LST computes it: in one piece within the logits budget, else chunks


METHODS = {
    method.name: method
    for method in (
        Method("lora", f"PEFT LoRA r={LORA_RANK} on PEFT's default targets (q_proj,v_proj / query,value)", _lora),
        Method("lst", f"Ladder Side-Tuning, r={LST_REDUCTION}, every layer", _lst),
        Method("full", "full fine-tuning, every parameter", _full),
        Method("theseus", "BERT-of-Theseus compression to half the layers, replacing rate 0.5", _theseus),
        Method("qlora", "LoRA on an nf4-quantized backbone (peft_ladder.quantize 'nf4')", _qlora),
        Method("lst-int8", "LST on an int8-quantized backbone (peft_ladder.quantize 'int8')", _lst_int8),
        Method(
            "lst-nf4",
            "LST on an nf4-quantized backbone (peft_ladder.quantize 'nf4')",
            _lst_nf4,
        ),
        # Extra baselines for the GPU comparison: LoRA with the two standard memory levers.
        Method("lora-chunked", "LoRA with the LM loss computed in checkpointed chunks", _lora, chunked_loss=True),
        Method("lora-gc", "LoRA with gradient checkpointing of every layer", _lora_checkpointed),
        Method("lst-compile", "LST with each side stack one torch.compile graph (compile_side=True)", _lst_compiled),
        Method(
            "lst-cudagraphs",
            "LST with the side stacks compiled as CUDA graphs (compile_side_network, mode='reduce-overhead')",
            _lst_cudagraphs,
            unavailable=_needs_cuda,
        ),
        Method("lst-drop", "LST with a side block on every other backbone layer (layer dropping)", _lst_dropped),
    )
}
DEFAULT_METHODS = ("lst", "lora", "full")


def training_loss(model: torch.nn.Module, method: Method, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss one training step of ``method`` backpropagates.

    With ``chunked_loss`` the (PEFT-wrapped) ``*ForCausalLM`` body runs alone and the next-token loss goes through
    its LM head through ``peft_ladder.ladder.chunked_causal_lm_loss``, as LST's own training does: in one piece when
    the fp32 logits of the labelled tokens fit in its budget, else in checkpointed chunks, so the full logits never
    exist.
    """
    if not method.chunked_loss:
        return model(**batch).loss
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden_states = causal_lm.base_model(input_ids=batch["input_ids"]).last_hidden_state
    return chunked_causal_lm_loss(hidden_states, batch["labels"], causal_lm.get_output_embeddings())


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count by their logical element count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
