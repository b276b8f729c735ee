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
from infinitrain.model.megalodon import MegalodonBlock, MegalodonState
from infinitrain.ops.loss import linear_cross_entropy
from infinitrain.ops.memory import AttnState, documents_inside


def build_block(config: ModelConfig, layer: int) -> nn.Module:
    """The family switch: every block maps (x, state, doc_start=) -> (x, state, aux loss) with its own state type."""
    if config.arch == "megalodon":
        return MegalodonBlock(config)
    return MoDBlock(config) if config.is_routed(layer) else Block(config)


def _detach_attn(s: AttnState) -> AttnState:
    return AttnState(type(s.mem)(s.mem.M.detach(), s.mem.z.detach()), s.k.detach(), s.v.detach(),
                     None if s.keep is None else s.keep, last=None if s.last is None else s.last.detach())


class ModelState(NamedTuple):
    """Per-layer streaming state. Infini: each layer's memory (M, z), the keys/values of the unfinished segment and
    (with ``token_shift``) the layer's last input token. MEGALODON: norm statistics, CEMA state, chunk cache."""

    layers: tuple[AttnState | MegalodonState, ...]

    def detach(self) -> "ModelState":
        """Cut the gradient at a truncated-BPTT window boundary (the values are kept)."""
        return ModelState(tuple(s.detach() if isinstance(s, MegalodonState) else _detach_attn(s) for s in self.layers))

    @property
    def tokens_in_segment(self) -> int:
        return self.layers[0].k.shape[2]

    def row(self, b: int) -> "ModelState":
        """Row b of the batch, (1, ...) in every tensor (views; the segment buffer is left behind, so that the row
        copies before it appends)."""
        if isinstance(self.layers[0], MegalodonState):
            return ModelState(tuple(s.row(b) for s in self.layers))

        def pick(t):
            return None if t is None else t[b:b + 1]

        return ModelState(tuple(AttnState(type(s.mem)(pick(s.mem.M), pick(s.mem.z)), pick(s.k), pick(s.v),
                                          pick(s.keep), pick(s.k_rot), None, pick(s.last)) for s in self.layers))

    @staticmethod
    def cat(states: "list[ModelState | None]") -> "ModelState":
        """Rows of several states, one batch (each holding the same number of tokens of its unfinished segment).
        None is a stream not started (zeros shaped like another row: only with no unfinished tokens). A row without
        a keep mask keeps every token; the rotated-key cache is kept only if every row has it."""
        ref = next(s for s in states if s is not None)
        if isinstance(ref.layers[0], MegalodonState):
            return ModelState(tuple(MegalodonState.cat([None if s is None else s.layers[i] for s in states])
                                    for i in range(len(ref.layers))))
        states = [s if s is not None else ModelState(tuple(AttnState(
            type(r.mem)(torch.zeros_like(r.mem.M), torch.zeros_like(r.mem.z)), r.k.new_zeros(r.k.shape),
            r.v.new_zeros(r.v.shape), None, last=None if r.last is None else torch.zeros_like(r.last))
            for r in ref.layers))
            for s in states]

        def join(ts: list, fill=None):
            if all(t is None for t in ts) or (fill is None and any(t is None for t in ts)):
                return None
            return torch.cat([fill(like) if t is None else t for t, like in zip(ts, rows_k)])

        layers = []
        for per_row in zip(*(st.layers for st in states)):
            rows_k = [s.k for s in per_row]
            layers.append(AttnState(
                type(per_row[0].mem)(torch.cat([s.mem.M for s in per_row]), torch.cat([s.mem.z for s in per_row])),
                torch.cat(rows_k), torch.cat([s.v for s in per_row]),
                join([s.keep for s in per_row], lambda k: torch.ones(1, k.shape[2], dtype=torch.bool, device=k.device)),
                join([s.k_rot for s in per_row]), None, join([s.last for s in per_row])))
        return ModelState(tuple(layers))


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
        state = ModelState(tuple(new_states))
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
        """Load a saved or exported model directory (never unpickles); see ``infinitrain.model.io``."""
        from infinitrain.model.io import from_pretrained

        return from_pretrained(directory, **kw)

    def generate(self, prompts, *, max_new_tokens: int = 128, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                 **callbacks) -> list[list[int]]:
        """Continue each prompt (lists of token ids) at constant memory; see ``infinitrain.infer.generate.generate``."""
        from infinitrain.infer.generate import Sampling, generate

        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_id=eos_id)
        return generate(self, prompts, sampling, generator=generator, **callbacks)


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
