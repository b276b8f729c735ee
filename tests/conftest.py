"""Shared test settings: one intra-op thread (tiny tensors run faster and steadier on a loaded 2-core box)."""

import torch

torch.set_num_threads(1)
