#!/usr/bin/env bash
# The Llama-3.2-3B-shaped GPU comparison in one command: bf16, sequence 768, AdamW, random weights.
#
# Cells run in priority order (the list is SUITES in bench.py) and bench.json is rewritten after each one, so a run
# cut short keeps every finished figure:
#   training, batches 16 and 4: LoRA and LST, LST on nf4 and QLoRA, LoRA + chunked loss, LoRA + gradient
#     checkpointing, layer-dropped LST, LST + compile_side (each side stack one torch.compile graph), full
#     fine-tuning, LST on int8, LST compiled as CUDA graphs (compile_side_network mode="reduce-overhead");
#     each with the --estimate prediction and the eval forward time with and without the adapter;
#   inference, batches 1 and 4: eval forward (no KV cache) and greedy generate() of 32 new tokens after the
#     768-token prompt, with the adapter and with it disabled (the base model): LST, LoRA, LST + compile_side,
#     LST as CUDA graphs.
# Each cell reports what torch.compile compiled (graphs, graph breaks, CUDA-graph skips) and its warm-up step times
# (the first includes compiling).
#
#   bash benchmarks/memory/gpu_llama3b.sh [OUTPUT_DIR] [extra python -m benchmarks.memory flags]
#   # CPU dry run: the tiny preset, every cell in one process, torch.compile on aot_eager (no code generation)
#   bash benchmarks/memory/gpu_llama3b.sh /tmp/dry --model tiny-llama --device cpu --seq-len 16 --steps 1 \
#       --warmup 1 --generate-tokens 4 --in-process --compile-backend aot_eager
set -euo pipefail
output_dir=${1:-runs/bench-gpu-llama3b-$(date -u +%Y%m%d-%H%M%S)}
shift || true
python=${PYTHON:-python3}
# benchmarks/ is not installed: find it through the repository root, wherever the script is started from
PYTHONPATH="$(cd "$(dirname "$0")/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec "$python" -m benchmarks.memory --suite gpu-llama3b --estimate --plot --output "$output_dir" "$@"
