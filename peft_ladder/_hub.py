"""Model cards and Hub pushes for adapters of our PEFT methods.

Two gaps in PEFT 0.21 and transformers 5 for a plugin method:

* ``PeftModel.save_pretrained`` writes the adapter's model card through ``PeftModel.create_or_update_model_card``,
  which has no hook for a method to add its tags or a usage snippet. Our adapters cannot load without
  ``import peft_ladder``, so the card must say so.
* ``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it saves the adapter, then overwrites the
  card with a fresh transformers card (``library_name: transformers``) and uploads everything in the folder.

:func:`install` wraps both methods once, at import. For adapters of other PEFT methods the wrappers call the original
unchanged; for ours, the card gets ``library_name: peft``, ``base_model``, the method's tags and a usage snippet, and
``push_to_hub`` uploads exactly that card and, for every saved adapter, its ``adapter_config.json`` and weights, laid
out as ``save_pretrained`` writes them (PEFT's convention: the adapter named ``"default"`` at the top of the
repository, any other in a subfolder named after it).
"""

from __future__ import annotations

import functools
import os
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from peft import PeftModel

from ._tuner import ModuleTuner

# The AutoPeftModel class a user loads each task type with (PEFT's own mapping, by task type value).
AUTO_CLASS_BY_TASK = {
    None: "AutoPeftModel",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}
# The transformers class of the base model, by task type value (for adapters loaded without AutoPeftModel).
BASE_CLASS_BY_TASK = {
    None: "AutoModel",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
USAGE_HEADING = "## Usage with peft-ladder"
CARD_FILE = "README.md"
CONFIG_FILE = "adapter_config.json"
# safetensors by default; ``save_pretrained(safe_serialization=False)`` writes the pickle file instead.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _our_tuner(peft_model) -> ModuleTuner | None:
    tuner = getattr(peft_model, "base_model", None)
    return tuner if isinstance(tuner, ModuleTuner) else None


def adapter_folder(adapter_name: str) -> str:
    """Where ``save_pretrained`` puts an adapter, relative to the save directory (``""``: at the top)."""
    return "" if adapter_name == "default" else adapter_name


def usage_snippet(
    peft_type: str,
    task_type: str | None,
    repo_or_path: str,
    adapter_names=("default",),
    base_model: str | None = None,
) -> str:
    """The card section that says how to load the adapters ``adapter_names`` saved at ``repo_or_path``.

    An adapter named "default" sits at the top of the repository and loads with ``AutoPeftModel*``. Any other sits in
    a subfolder, which ``AutoPeftModel*.from_pretrained(subfolder=...)`` would also look for the base model in, so
    without a "default" adapter the snippet loads the base model itself and calls ``PeftModel.from_pretrained``.
    """
    first, *others = adapter_names
    if adapter_folder(first):
        base_class = BASE_CLASS_BY_TASK.get(task_type, "AutoModel")
        imports = f"from peft import PeftModel\nfrom transformers import {base_class}"
        lines = [
            f'base = {base_class}.from_pretrained("{base_model or "path/to/the/base/model"}")',
            f'model = PeftModel.from_pretrained(base, "{repo_or_path}"{_load_options(first)})',
        ]
    else:
        auto_class = AUTO_CLASS_BY_TASK.get(task_type, "AutoPeftModel")
        imports = f"from peft import {auto_class}"
        lines = [f'model = {auto_class}.from_pretrained("{repo_or_path}")']
    lines += [f'model.load_adapter("{repo_or_path}"{_load_options(name)})' for name in others]
    return (
        f"{USAGE_HEADING}\n\n"
        f"This adapter uses the `{peft_type}` method of [peft-ladder](https://pypi.org/project/peft-ladder/). "
        "PEFT only knows the method after `import peft_ladder`; without it, loading fails with "
        f"`KeyError('{peft_type}')`.\n\n"
        "```python\n"
        "import peft_ladder  # registers the method with PEFT: pip install peft-ladder\n"
        f"{imports}\n\n" + "\n".join(lines) + "\n```\n"
    )


def _load_options(adapter_name: str) -> str:
    subfolder = adapter_folder(adapter_name)
    return (f', subfolder="{subfolder}"' if subfolder else "") + f', adapter_name="{adapter_name}"'


def update_card(peft_model, output_dir: str, repo_id: str | None = None, adapter_names=None) -> None:
    """Add our tags, ``library_name: peft`` and the usage snippet to the card PEFT wrote in ``output_dir``.

    ``adapter_names`` are the adapters saved there (default: every adapter of the model).
    """
    tuner = _our_tuner(peft_model)
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path)
    config = peft_model.active_peft_config
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | {"peft", "peft-ladder", *tuner.card_tags})
    base_model = config.base_model_name_or_path or card.data.get("base_model")
    if base_model:
        card.data["base_model"] = base_model
    task_type = config.task_type.value if hasattr(config.task_type, "value") else config.task_type
    names = sorted(adapter_names or peft_model.peft_config, key=lambda name: name != "default")  # "default" first
    snippet = usage_snippet(config.peft_type.value, task_type, repo_id or "path/to/this/adapter", names, base_model)
    text = card.text
    if USAGE_HEADING in text:  # re-saving into the same folder: replace our section, keep the user's edits
        start = text.index(USAGE_HEADING)
        end = text.find("\n## ", start + len(USAGE_HEADING))
        text = text[:start] + snippet + ("" if end == -1 else text[end:])
    else:
        text = snippet + "\n" + text
    card.text = text
    card.save(path)


def install() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` and ``PeftModel.push_to_hub`` once (idempotent)."""
    if getattr(PeftModel.create_or_update_model_card, "_peft_ladder", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_push = PeftModel.push_to_hub

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        original_card(self, output_dir)
        if _our_tuner(self) is not None:
            update_card(self, output_dir)

    @functools.wraps(original_push)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if _our_tuner(self) is None:
            return original_push(self, repo_id, *args, **kwargs)
        return push_adapter_to_hub(self, repo_id, **kwargs)

    create_or_update_model_card._peft_ladder = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push_to_hub


def push_adapter_to_hub(
    peft_model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    **save_kwargs,
):
    """Upload the card and every saved adapter's config and weights (nothing else) to ``repo_id`` on the Hub.

    ``save_kwargs`` go to ``save_pretrained``; ``selected_adapters`` there picks the adapters (default: all of them).
    """
    selected = save_kwargs.get("selected_adapters") or list(peft_model.peft_config)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, **save_kwargs)
        update_card(peft_model, folder, repo_id=repo_id, adapter_names=selected)
        paths_in_repo = [CARD_FILE]
        for name in selected:
            paths_in_repo.extend(_saved_adapter_files(folder, name))
        operations = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(folder, *path.split("/")))
            for path in paths_in_repo
        ]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {peft_model.active_peft_config.peft_type.value} adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def _saved_adapter_files(folder: str, adapter_name: str) -> list[str]:
    """Repository paths of the config and weights that ``save_pretrained`` wrote in ``folder`` for ``adapter_name``."""
    subfolder = adapter_folder(adapter_name)
    prefix = f"{subfolder}/" if subfolder else ""
    found = [name for name in (CONFIG_FILE, *WEIGHT_FILES) if os.path.exists(os.path.join(folder, subfolder, name))]
    if CONFIG_FILE not in found or len(found) < 2:
        # Never push a repository that silently lacks an adapter the user trained.
        raise RuntimeError(
            f"save_pretrained wrote no {CONFIG_FILE} or no weights for adapter {adapter_name!r} in "
            f"'{subfolder or '.'}'; nothing was uploaded."
        )
    return [prefix + name for name in found]
