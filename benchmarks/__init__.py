"""The research harness of peft-ladder: memory and speed benchmarks, quality suites and the demo.

Not part of the installed package (``pip install peft-ladder`` ships the library alone). Run it from the repository
root, e.g. ``python -m benchmarks.demo`` or ``python -m benchmarks.memory --help``. It uses only the public API of
``peft_ladder``.

Importing it points Hugging Face at a cache inside the repository (``.cache/hf``), where ``benchmarks.assets`` lays
out the offline copies of the real models under their Hub ids, and turns the Hub off unless ``HF_HUB_OFFLINE`` says
otherwise: a run never reads or writes your own cache. This has to happen before ``huggingface_hub`` is imported,
which reads these variables once.
"""

import logging
import os
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"  # git-ignored
HF_HOME = CACHE_DIR / "hf"

os.environ["HF_HOME"] = str(HF_HOME)
os.environ["HF_HUB_CACHE"] = str(HF_HOME / "hub")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Import-time notes of the pinned stack that say nothing about a run: torchao's optional CUDA kernels missing on a CPU
# machine, torch's note on how torchao registers its enums.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def quiet() -> None:
    """Keep a benchmark's console to its own progress and results: no load reports, no known deprecation notes."""
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()  # load reports ("newly initialized: classifier"), tips
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    huggingface_hub.utils.disable_progress_bars()  # "Writing model shards" bars
    for message, category in (
        (".*is_gradient_checkpointing.*", FutureWarning),  # PEFT reads a renamed transformers attribute
        (".*quantize_per_tensor.*", UserWarning),  # int8-dynamic (torch.ao quantize_dynamic) is deprecated upstream
        ("Could not find a config file in", UserWarning),  # PEFT asks the (offline) Hub while saving an adapter
    ):
        warnings.filterwarnings("ignore", message=message, category=category)
