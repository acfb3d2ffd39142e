"""The research harness of peft-ladder: memory and speed benchmarks, quality suites and the demo.

Not part of the installed package (``pip install peft-ladder`` ships the library alone). Run it from the repository
root, e.g. ``python -m benchmarks.demo`` or ``python -m benchmarks.memory --help``. It uses only the public API of
``peft_ladder``.

Importing it points Hugging Face at a cache inside the repository (``.cache/hf``), where ``benchmarks.assets`` lays
out the offline copies of the real models under their Hub ids, and turns the Hub off unless ``HF_HUB_OFFLINE`` says
otherwise: a run never reads or writes your own cache. This has to happen before ``huggingface_hub`` is imported,
which reads these variables once.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"  # git-ignored
HF_HOME = CACHE_DIR / "hf"

os.environ["HF_HOME"] = str(HF_HOME)
os.environ["HF_HUB_CACHE"] = str(HF_HOME / "hub")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
