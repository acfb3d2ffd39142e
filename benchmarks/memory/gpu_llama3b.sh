#!/usr/bin/env bash
# The Llama-3.2-3B-shaped GPU comparison in one command: bf16, sequence 768, AdamW, random weights, batches 16 and 4.
#
# Cells run in priority order (LoRA and LST at b16 and b4, LST on nf4 and QLoRA, LoRA + chunked loss, LoRA + gradient
# checkpointing, layer-dropped LST, LST + torch.compile, full fine-tuning, LST on int8; the list is SUITES in bench.py)
# and bench.json is rewritten after each one, so a run cut short keeps every finished figure. Each cell also carries
# the --estimate prediction and the inference time with and without the adapter. About 2.5 minutes on an H200.
#
#   bash benchmarks/memory/gpu_llama3b.sh [OUTPUT_DIR] [extra python -m benchmarks.memory flags]
#   bash benchmarks/memory/gpu_llama3b.sh /tmp/dry --model tiny-llama --device cpu --steps 1   # CPU dry run
set -euo pipefail
output_dir=${1:-runs/bench-gpu-llama3b-$(date -u +%Y%m%d-%H%M%S)}
shift || true
python=${PYTHON:-python3}
# benchmarks/ is not installed: find it through the repository root, wherever the script is started from
PYTHONPATH="$(cd "$(dirname "$0")/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec "$python" -m benchmarks.memory --suite gpu-llama3b --estimate --plot --output "$output_dir" "$@"
