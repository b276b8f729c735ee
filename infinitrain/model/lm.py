"""The causal language model ``InfiniLM``: embeddings, blocks of one family (``model.arch``: Infini-attention, some
Mixture-of-Depths routed, or MEGALODON), norm, LM head.

``out = model(input_ids, state)`` returns logits, the state to pass back to continue the stream,
and the Mixture-of-Depths auxiliary loss; any number of tokens per call (generation feeds one).
With ``targets`` (training) it returns the summed token cross-entropy instead of the logits, computed chunk by
chunk so that the (B, T, V) logits are never all kept: fused with the LM head (``ops/loss.py``: its gradients
made in the forward pass, no recompute), or, for a class head or an adapter-wrapped head, under activation
checkpointing.
Shape legend: B batch, T tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infinitrain.errors import ConfigError
from infinitrain.model.config import ModelConfig
from infinitrain.model.layers import Block, MoDBlock, RMSNorm
from infinitrain.model.megalodon import MegalodonBlock
from infinitrain.model.state import ModelState
from infinitrain.ops.loss import linear_cross_entropy
from infinitrain.ops.memory import documents_inside


def build_block(config: ModelConfig, layer: int) -> nn.Module:
    """The family switch: every block maps (x, state, doc_start=) -> (x, state, aux loss) with its own state type."""
    if config.arch == "megalodon":
        return MegalodonBlock(config)
    return MoDBlock(config) if config.is_routed(layer) else Block(config)


class LMOutput(NamedTuple):
    logits: Tensor | None  # (B, T, V); None when the call was given targets
    state: ModelState
    aux_loss: Tensor  # scalar: sum of the Mixture-of-Depths BCE losses (0 without MoD)
    loss_sum: Tensor | None = None  # () summed fp32 cross-entropy of the masked-in targets (calls given targets)
    token_loss: Tensor | None = None  # (B, T) that cross-entropy per token, detached (0 where masked out)


class LMHead(nn.Linear):
    """The output layer (bias-free Linear D -> V). Given targets it returns the fused loss in place of the logits
    (``linear_cross_entropy``): called as a module either way, so that ZeRO-3's hooks gather its weight for it."""

    def forward(self, x: Tensor, targets: Tensor | None = None, mask: Tensor | None = None,
                chunk: int = 512) -> Tensor | tuple[Tensor, Tensor]:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, targets, mask, chunk)


class InfiniLM(nn.Module):
    """Causal LM of Infini-attention blocks. Gate parameters (``betas``) are exposed by ``gate_parameters()``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if config.labels is not None:  # a classifier: class logits (B, T, C) in place of next-token logits
            self.score = nn.Linear(config.d_model, len(config.labels), bias=False)
        else:
            self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            if hasattr(module, "reset_own_parameters"):  # a layer's non-Linear parameters (MEGALODON's CEMA ...)
                module.reset_own_parameters()
        betas = torch.tensor(self.config.gate_init_per_head())
        for p in self.gate_parameters():
            if p.numel():  # empty when partitioned by zero.Init: engine._init_module sets it then
                p.copy_(betas)
        for p in self.tau_parameters():
            p.fill_(math.log(self.config.memory_tau))

    def gate_parameters(self) -> list[nn.Parameter]:
        """The per-head gates β: train them with their own learning rate and no weight decay."""
        return [p for n, p in self.named_parameters() if n.endswith("betas")]

    def tau_parameters(self) -> list[nn.Parameter]:
        """The memory temperatures log τ (``model.memory_tau``; none by default): the main lr, no weight decay
        (not the gates' lr: that drove one τ past 500 in 900 steps, and gate_lr = 0 must not freeze them)."""
        return [p for n, p in self.named_parameters() if n.endswith("log_tau")]

    def forward(self, input_ids: Tensor, state: ModelState | None = None, *, doc_start: Tensor | None = None,
                targets: Tensor | None = None, loss_mask: Tensor | None = None,
                loss_chunk: int | None = None, doc_inside: bool | None = None) -> LMOutput:
        """input_ids (B, T); state from the previous call (None starts fresh); doc_start (B, T) bool marks
        the first token of each packed document (segment-aligned calls only): nothing crosses it. doc_inside:
        whether one starts inside a segment (None: read from doc_start here, once, not in every layer; the
        trainer passes it from its host copy, so the layer loop never waits for the device).
        targets (B, T) (with loss_mask (B, T), default all) returns the loss in place of the logits, computed
        ``loss_chunk`` tokens at a time (default: one segment)."""
        x, state, aux = self.hidden(input_ids, state, doc_start=doc_start, doc_inside=doc_inside)
        if targets is None:
            return LMOutput(self.head(x), state, aux)
        mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask
        chunk = loss_chunk or self.config.segment_len
        if isinstance(getattr(self, "lm_head", None), LMHead):  # not a classifier, not wrapped by an adapter
            loss_sum, ce = self.lm_head(self.norm(x), targets=targets, mask=mask, chunk=chunk * x.shape[0])
            return LMOutput(None, state, aux, loss_sum, ce)
        ce = []
        for a in range(0, x.shape[1], chunk):
            args = (x[:, a:a + chunk], targets[:, a:a + chunk], mask[:, a:a + chunk])
            # recomputed in backward: the chunk's logits live only while it is differentiated
            ce.append(checkpoint(self._chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else self._chunk_loss(*args))
        loss_sum = sum(c.sum() for c in ce)
        return LMOutput(None, state, aux, loss_sum, torch.cat(ce, dim=1).detach())

    def hidden(self, input_ids: Tensor, state: ModelState | None = None, *, doc_start: Tensor | None = None,
               doc_inside: bool | None = None) -> tuple[Tensor, ModelState, Tensor]:
        """Embeddings and every block, each with its state: (hidden (B, T, D) before the final norm, the new state,
        the summed Mixture-of-Depths auxiliary loss). The one layer loop of training, evaluation and generation."""
        x = self.embed(input_ids)  # (B, T, D)
        layer_states = [None] * len(self.layers) if state is None else list(state.layers)
        aux = x.new_zeros((), dtype=torch.float32)
        docs = {}
        if doc_start is not None:
            inside = doc_inside
            if inside is None and doc_start.shape[1] % self.config.segment_len == 0:  # else the layers refuse it
                inside = documents_inside(doc_start, self.config.segment_len)
            docs = dict(doc_start=doc_start, doc_inside=inside)
        new_states = []
        for layer, s in zip(self.layers, layer_states):
            x, s, a = layer(x, s, **docs)
            new_states.append(s)
            aux = aux + a
        return x, ModelState(tuple(new_states)), aux

    def head(self, x: Tensor) -> Tensor:
        """Final norm and the output head (LM head or class head ``score``): hidden (B, T, D) -> logits."""
        return (self.lm_head if self.config.labels is None else self.score)(self.norm(x))

    def _chunk_loss(self, x: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """fp32 cross-entropy (B, c) of one chunk, 0 where masked out. The head is called as a module, so that
        ZeRO-3's hooks gather its weight here and again when the checkpoint recomputes it."""
        logits = self.head(x).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape) * mask

    def save_pretrained(self, directory, **kw):
        """Write config.json + safetensors weights; see ``infinitrain.model.io.save_pretrained``."""
        from infinitrain.model.io import save_pretrained

        return save_pretrained(self, directory, **kw)

    @classmethod
    def from_pretrained(cls, directory, **kw) -> "InfiniLM":
        """Load a model saved by ``save_pretrained`` (or ``infinitrain export``), in eval mode; never unpickles
        (``infinitrain.model.io``). Keywords: ``dtype`` ("fp32", "bf16", "fp16" or a torch dtype), ``device``."""
        from infinitrain.model.io import load_weights, read_config

        config, _ = read_config(directory)
        with torch.device("meta"):
            model = cls(config)
        return load_weights(model, directory, **kw)

    def generate(self, prompts, *, max_new_tokens: int = 128, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                 **callbacks) -> list[list[int]]:
        """Continue each prompt (lists of token ids) at constant memory; see ``infinitrain.infer.generate.generate``."""
        from infinitrain.infer.generate import Sampling, generate

        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_id=eos_id)
        return generate(self, prompts, sampling, generator=generator, **callbacks)


def count_parameters(config: ModelConfig) -> int:
    """Parameter count of ``InfiniLM(config)``, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = InfiniLM(config)
    return sum(p.numel() for p in model.parameters())


def check_memory_tau_scale(factor: float) -> float:
    """``factor`` if it is a valid ``--memory-tau-scale`` (a finite number > 0), else a one-line ConfigError."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ConfigError(f"--memory-tau-scale must be a finite number > 0, got {factor!r}")
    return factor


def scale_memory_tau(model: InfiniLM, factor: float, where: str = "model") -> InfiniLM:
    """Multiply every memory temperature τ by ``factor``, in place (log τ += log factor): the memory then reads
    σ(f·τ·q) and writes σ(f·τ·k). A sharper read for a context many times longer than the training samples, where
    more segments share the memory (``--memory-tau-scale``; choose it on validation prompts, as
    benchmarks/quality/passkey.sh does). factor 1 leaves the model untouched; a model without temperatures
    (``model.memory_tau`` null) accepts only 1. ``where`` names the model in the one-line error."""
    if check_memory_tau_scale(factor) == 1:
        return model
    taus = model.tau_parameters()
    if not taus:
        raise ConfigError(f"{where}: --memory-tau-scale needs memory temperatures (model.memory_tau), this model "
                          "has none")
    with torch.no_grad():
        for p in taus:
            p.add_(math.log(factor))
    return model
