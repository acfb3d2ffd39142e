"""Peak training memory, step time and trainable parameters of each method on the same inputs.

``python -m benchmarks.memory --help``; the GPU comparison is ``bash benchmarks/memory/gpu_llama3b.sh``.
"""
