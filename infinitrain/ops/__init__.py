"""Pure tensor ops of Infini-attention and positional embeddings; no modules, no hidden state."""

from infinitrain.ops.memory import (
    UPDATES,
    AttnState,
    MemoryState,
    delta_update,
    gate,
    infini_attention,
    infini_attention_naive,
    infini_attention_partial,
    infini_attention_stream,
    linear_update,
    local_attention,
    memory_update,
    retrieve,
    sigma,
    zero_attn_state,
    zero_memory,
)
from infinitrain.ops.rope import (RotarySpec, apply_rotary, apply_rotary_at, apply_rotary_naive, rope_inv_freq,
                                  rope_mscale, rope_table)

__all__ = [
    "UPDATES", "AttnState", "MemoryState", "RotarySpec", "apply_rotary", "apply_rotary_at", "apply_rotary_naive",
    "delta_update", "gate", "infini_attention", "infini_attention_naive", "infini_attention_partial",
    "infini_attention_stream", "linear_update", "local_attention", "memory_update", "retrieve", "rope_inv_freq",
    "rope_mscale", "rope_table", "sigma", "zero_attn_state", "zero_memory",
]
