"""Every script in examples/ runs end to end with a tiny step budget, so the examples cannot rot.

Each script runs as a user would run it, `python examples/<script>.py ...`, in a subprocess on the real offline
assets, with 2 optimizer steps and a few dozen sentences. A script with its own smoke test elsewhere is listed in
`TESTED_ELSEWHERE`; a new example must be added to one of the two tables, or `test_every_example_has_a_smoke_test`
fails.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 600

# Trainer-flag budget shared by the HfArgumentParser scripts: 2 steps, tiny batches, quiet, nothing saved on the way.
TINY_TRAINER = [
    "--max_steps", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
    "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip

# script -> (arguments, a line its output must contain)
SMOKE_RUNS = {
    "lst_text_classification.py": (
        [*TINY_TRAINER, "--max_train_samples", "32", "--max_eval_samples", "32", "--max_length", "32"],
        "validation accuracy after reloading with AutoPeftModel",
    ),
    "lst_causal_lm.py": (
        [*TINY_TRAINER, "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2"]
        + ["--block_size", "32", "--max_train_blocks", "8", "--max_eval_blocks", "2", "--max_new_tokens", "6"],
        "reloaded adapter:",
    ),
    "theseus_compress.py": (
        [*TINY_TRAINER, "--max_train_samples", "32", "--max_eval_samples", "32", "--max_length", "32"],
        "saved and reloaded: 3 layers",
    ),
    "quantized_backbone_lst.py": (["--steps", "2"], "validation accuracy"),
}
TESTED_ELSEWHERE = {"distill.py": "tests/distill/test_example.py"}


def run_example(script: str, arguments: list[str], workdir: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny batches gain little from threads, and threads spin on busy CPUs
    command = [sys.executable, str(EXAMPLES / script), *arguments]
    if "--max_steps" in arguments:
        command += ["--output_dir", str(workdir / "output")]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_every_example_has_a_smoke_test():
    scripts = {path.name for path in EXAMPLES.glob("*.py")}
    untested = scripts - SMOKE_RUNS.keys() - TESTED_ELSEWHERE.keys()
    assert not untested, f"add a tiny-budget run of {sorted(untested)} to SMOKE_RUNS in {__file__}"
    for script, test_file in TESTED_ELSEWHERE.items():
        if script in scripts:
            assert (EXAMPLES.parent / test_file).is_file(), f"{script}'s smoke test {test_file} is missing"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_example_runs_with_a_tiny_budget(script, tmp_path, request):
    if not (EXAMPLES / script).is_file():
        pytest.skip(f"examples/{script} is not in this checkout")
    # the assets the script needs: skips with the install command if missing, converts SmolLM2 once if needed
    request.getfixturevalue("smollm2_dir" if script == "lst_causal_lm.py" else "minilm_dir")
    arguments, expected_output = SMOKE_RUNS[script]
    result = run_example(script, arguments, tmp_path)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert expected_output in result.stdout, result.stdout[-3000:]
