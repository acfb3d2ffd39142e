"""The README's Python blocks run as written, so the documentation cannot drift from the code."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, minilm_hub_id, tmp_path, monkeypatch):
    # the blocks load MiniLM by its Hub id, served offline from the repository's cache (tests/conftest.py)
    monkeypatch.chdir(tmp_path)  # blocks that save adapters write into a scratch directory
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
