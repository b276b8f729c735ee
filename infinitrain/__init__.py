"""infinitrain: train and run Infini-attention language models (arXiv 2404.07143) on DeepSpeed."""

import os

__version__ = "0.1.0"

# Large CPU tensors (>= 2 MiB) in transparent huge pages: torch reads THP_MEM_ALLOC_ENABLE once, at its first
# allocation, so it is set here, before anything imports torch (THP_MEM_ALLOC_ENABLE=0 in the environment keeps
# 4 KiB pages). A training step allocates its activations afresh in every window; in 4 KiB pages the kernel
# faulted each one in (8K tokens, window 4, fp32, the 58 M model: 5.3 M minor faults and 6% of the CPU time in
# the kernel; with huge pages 0.86 M and 2.5%, same run).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
