"""Fisher initialisation: score the backbone's weights on data, then prune the side network with those scores.

The pruning itself is the same as the default magnitude init (:mod:`.init`); only the importance of each backbone
weight changes, from |W| to the squared gradient of an objective. What objective makes those gradients meaningful
depends on the head the model will train (see :func:`fisher_init_`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from peft.utils import TaskType
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.nn import functional as F

OBJECTIVES = ("auto", "task", "representation", "probe")


def fisher_init_(
    peft_model,
    dataloader: Iterable,
    num_batches: int = 8,
    objective: str = "auto",
    num_examples: int | None = None,
    probe_steps: int = 200,
) -> dict:
    """Re-initialise the active adapter's side network by pruning with Fisher importance (the paper's init).

    Call it right after ``get_peft_model`` (on a fresh adapter: it overwrites the side network's weights), with a
    dataloader of the training data: batches are dicts of model inputs, with ``labels`` for the task objectives.
    Importance is the squared gradient of each backbone weight: summed over the first ``num_batches`` batches, or,
    with ``num_examples``, over that many examples taken one at a time (the empirical Fisher, as the official code
    scores it; ``num_batches`` is then not used).

    ``objective``:

    * ``"task"``: the model's own loss (needs ``labels``). Right for heads that are already trained, as the LM head
      of ``CAUSAL_LM`` / ``SEQ_2_SEQ_LM``.
    * ``"probe"``: for a freshly initialised head (``SEQ_CLS``, ``TOKEN_CLS``): the trainable head is first fitted as
      a probe of the frozen model's features on the same examples (``probe_steps`` full-batch Adam steps on the
      cross-entropy, or the squared error for a single-output head), then the task loss is scored through it. The
      head gets its initial weights back afterwards, so training starts where it would have without Fisher.
    * ``"representation"``: the Fisher information of the backbone's last hidden state h under a unit-Gaussian
      observation model, E_g[(d<h, g>/dW)^2] = sum_j (dh_j/dW)^2, estimated with one Gaussian probe vector g per
      batch or example: which weights the representation is most sensitive to, whatever the head.
    * ``"auto"`` (default): ``"task"`` for LM task types when labels are present, else ``"representation"``.

    Returns the importance tensors, keyed by backbone parameter name. Nothing is changed if the arguments are
    invalid or the data lacks what the objective needs.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 1):
        raise ValueError(f"num_examples must be a positive int or None, got {num_examples!r}.")
    tuner = peft_model.base_model
    name = tuner.active_adapter
    config = tuner.peft_config[name]
    model = tuner.model
    language_model = config.task_type in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)
    head = _trainable_head(model, name) if objective == "probe" else None
    # read the data once, before anything is modified: a missing label fails here
    inputs = list(_examples(dataloader, num_examples) if num_examples else _batches(dataloader, num_batches))
    if not inputs:
        raise ValueError("fisher_init_ got no batches: the dataloader is empty.")
    needs_labels = objective in ("task", "probe")
    if needs_labels and any("labels" not in batch for batch in inputs):
        raise ValueError(f"objective={objective!r} scores the task loss, so every batch needs 'labels'.")

    params = dict(model.named_parameters())
    saved_flags = {key: p.requires_grad for key, p in params.items()}
    importance = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params.values()}
    head_start = {key: value.detach().clone() for key, value in head.state_dict().items()} if head else None
    was_training = model.training
    model.eval()
    try:
        with tuner.backbone_only():
            if head is not None:
                _fit_probe_(model, head, inputs, probe_steps)
            for p in params.values():
                p.requires_grad_(True)
            with torch.enable_grad():
                for batch in inputs:
                    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
                    use_task = objective in ("task", "probe") or (
                        objective == "auto" and "labels" in batch and language_model
                    )
                    model.zero_grad(set_to_none=True)
                    _objective(model, batch, use_task).backward()
                    for p in params.values():
                        if p.grad is not None:
                            importance[id(p)] += p.grad.detach().float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for key, p in params.items():
            p.requires_grad_(saved_flags[key])
        if head is not None:
            head.load_state_dict(head_start)
        model.train(was_training)
    tuner.reinitialize_side_network(name, importance=importance)
    config.init = "fisher"
    return {key: importance[id(p)] for key, p in params.items()}


def _objective(model: nn.Module, batch: dict, use_task: bool) -> torch.Tensor:
    if use_task:
        return model(**batch).loss
    output = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    last = (getattr(output, "decoder_hidden_states", None) or output.hidden_states)[-1]
    return (last * torch.randn_like(last)).sum()


def _batches(dataloader: Iterable, num_batches: int) -> Iterator[dict]:
    for index, batch in enumerate(dataloader):
        if index >= num_batches:
            break
        yield batch


def _examples(dataloader: Iterable, num_examples: int) -> Iterator[dict]:
    """Single examples (batch dimension 1) cut from the dataloader's batches, ``num_examples`` in all."""
    count = 0
    for batch in dataloader:
        size = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
        for row in range(size):
            if count == num_examples:
                return
            yield {k: v[row : row + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            count += 1


def _trainable_head(model: nn.Module, adapter_name: str) -> nn.Module:
    """The adapter's one trainable head (its ``modules_to_save`` copy), which ``objective="probe"`` fits."""
    heads = [m.modules_to_save[adapter_name] for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    heads = [head for head in heads if any(True for _ in head.parameters())]
    if len(heads) != 1:
        raise ValueError(
            f"objective='probe' fits the adapter's trainable head, but it has {len(heads)} modules_to_save with "
            "weights; it needs exactly one (e.g. modules_to_save=['classifier']). Use objective='representation'."
        )
    return heads[0]


def _fit_probe_(model: nn.Module, head: nn.Module, batches: list[dict], steps: int) -> None:
    """Fit ``head`` on the frozen model's features of ``batches`` (its inputs, captured once), full batch."""
    features, labels = [], []

    def capture(module, args):
        features.append(args[0].detach())

    handle = head.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
                labels.append(batch["labels"])
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    # one tensor per feature shape (a head reading (batch, length, width) features sees several lengths)
    groups: dict[tuple, tuple[list, list]] = {}
    for feature, label in zip(features, labels):
        group = groups.setdefault(tuple(feature.shape[1:]), ([], []))
        group[0].append(feature)
        group[1].append(label)
    groups = [(torch.cat(group_features), torch.cat(group_labels)) for group_features, group_labels in groups.values()]
    count = sum(label.numel() for _, label in groups)
    flags = {p: p.requires_grad for p in head.parameters()}
    head.requires_grad_(True)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                loss = sum(_probe_loss(head(group_features), group_labels) for group_features, group_labels in groups)
                loss = loss / count
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _probe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (squared error for a single-output regression head); label -100 is ignored."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="sum")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
