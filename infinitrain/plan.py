"""``infinitrain plan``: per-GPU memory of a recipe before renting a cluster (ZeRO states, activations as the trainer
keeps them, memory states, buffers) and the tokens per step.

Symbols: Ψ parameters, N GPUs (data parallel), e bytes per parameter element (bf16 2, fp32 4), L layers,
B micro-batch, W segments per backward (TBPTT window), S segment length, T = B·W·S tokens per backward,
D model dim, H query heads, G KV heads, K head dim, F FFN dim, V vocabulary. Bytes are decimal (1 GB = 1e9).

Model states follow DeepSpeed 0.19 with our generated config (torch AdamW; gradients accumulated and reduced
in fp32 at ZeRO-2/3, ``data_types.grad_accum_dtype``): mixed precision keeps e·Ψ parameters, 4Ψ gradients (e·Ψ
below ZeRO-2) and 12Ψ optimizer states (fp32 master, Adam m and v); fp32 keeps 4Ψ + 4Ψ + 8Ψ (the parameters
are the master copy). ZeRO-1 partitions the optimizer states over N,
ZeRO-2 the gradients too, ZeRO-3 the parameters too (those under stage3_param_persistence_threshold stay
whole on every GPU).

Activations are what autograd saves in ``Block.forward`` as the trainer calls it (``doc_start`` given; when
no document starts inside a segment, local attention is one 4-D causal SDPA call, which PyTorch's fused
kernels take: they keep q, k, v, the output and a fp32 log-sum-exp, 4·H bytes per token, never the S×S
probabilities). Per layer, per token (``tests/test_plan.py`` holds this to the bytes autograd saves):
    A = (8 + 5e)·H·K + 4·H·(K+1) + 12·H + 12·G·K + (8 + 4e)·D + 4e·F + 10
plus, once for the model, the RoPE table both rotations of every layer read (fp32 cos and sin of one segment's
positions, 8·S·R bytes with R rotated dims; ``rope_table_bytes``).
A window with a document starting inside a segment takes the masked 4-D path instead, which keeps the
boolean mask cast to the dtype as well, e·S more per token and layer (not in the plan).
and per segment A_seg = 4·H·K·(K+1) (the memory read by each segment, broadcast to the query heads).
Checkpointing (``tbptt.checkpointing``): none keeps every layer's A over T; layer keeps each layer's input
(e·D per token) and recomputes one layer at a time; segment keeps each layer's input and its (M, z) before
every segment, and recomputes one (layer, segment) at a time.

The loss is fused with the LM head (``InfiniLM.forward(..., targets=)``, ``ops/loss.py``): one segment's B·S tokens
at a time, its logits and their gradient made and dropped in forward. The window keeps the final norm's input,
scale and output and the hidden states' gradient ((3e·D + 4)·T, plus the norm's fp32 copy 4·D·T below fp32) and
the head's gradient (e·V·D, whatever T).

MEGALODON (``model.arch: megalodon``): a block's saved tensors (CEMA blocks and scan, timestep-norm sums, the
chunk softmax, which takes PyTorch's math path because Z ≠ V per head) have too many shape-dependent terms for a
closed formula, so the plan traces one block on the meta device (shapes only: no memory, no compute) at the
window's (B, W·S) and counts the storages autograd saves, M(B, t) bytes; ``tests/test_plan.py`` holds the trace
to a real CPU run. The carried state is the CEMA state and norm statistics, 8·D·h + 8·groups + 8 bytes per row.

On top, during a window's backward: the working set of the unit being differentiated (its activations again;
no S×S score gradients, the fused kernel works tile by tile), one chunk's logits and loss
B·S·V·(2e + 12) (made at the end of the forward), the carried (M, z) and ZeRO-3's buffers; at the optimizer
step, a fp32 copy of the gradient partition. The peak is the held model states plus the larger of those two phases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from infinitrain.errors import ConfigError

GB = 1e9
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
               "stage3_param_persistence_threshold": 1e5}  # DeepSpeed 0.19 zero_optimization defaults
HEADROOM = 0.9  # a plan "fits" below 90% of the GPU: CUDA context, NCCL buffers and allocator fragmentation


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    formula: str
    when: str = "always"  # "always" (held for the whole step), "backward" (during a window), "step" (optimizer step)


@dataclass(frozen=True)
class Plan:
    title: str
    gpus: int
    nodes: int
    gpu_memory: float
    params: int
    terms: tuple[Term, ...]
    tokens_per_backward: int
    tokens_per_step: int
    notes: tuple[str, ...]

    @property
    def peak(self) -> float:
        """Held states plus the larger of the two transient phases (a window's backward, the optimizer step)."""
        held = sum(t.bytes for t in self.terms if t.when == "always")
        return held + max(sum(t.bytes for t in self.terms if t.when == w) for w in ("backward", "step"))

    @property
    def fits(self) -> bool:
        return self.peak <= HEADROOM * self.gpu_memory


# --- per-layer activation bytes --------------------------------------------------------------------------


def ffn_bytes_per_token(activation: str, d_ff: int, e: int) -> int:
    """SwiGLU-style (ffn*): gate, up, act(gate), product; GLU layer (swiglu/geglu): up, w, act, v, product;
    plain: up, act(up)."""
    n = 4 if activation.startswith("ffn") else 5 if activation in ("swiglu", "geglu") else 2
    return n * e * d_ff


def layer_bytes_per_token(model, e: int, segment_len: int | None = None, rope_tables: int = 0) -> float:
    """A: bytes autograd keeps per token for one dense block (formula in the module docstring). A dense block
    rotates from the cached table of one segment (``rope_table_bytes``, nothing per token); where positions vary
    per row (Mixture-of-Depths' routed tokens) cos and sin (fp32, rot_dim each) are built per token for q and
    for k (``rope_tables=4``)."""
    H, G, K, D = model.n_heads, model.n_kv_heads, model.head_dim, model.d_model  # segment_len: no term depends on S
    rotary = 4 * rope_tables * model.rot_dim if model.pos_emb != "none" else 0
    return ((8 + 5 * e) * H * K + 4 * H * (K + 1) + 12 * H + 12 * G * K + (8 + 4 * e) * D
            + ffn_bytes_per_token(model.activation, model.d_ff, e) + rotary + 10)


def rope_table_bytes(model) -> float:
    """The RoPE table every dense layer's rotation reads (fp32 cos and sin of the S in-segment positions): held
    once, whatever the number of layers or tokens."""
    return 0 if model.pos_emb == "none" else 8 * model.segment_len * model.rot_dim


def segment_bytes(model) -> float:
    """A_seg: per layer and segment, the memory [M | z] broadcast to the H query heads for retrieval."""
    return 4 * model.n_heads * model.head_dim * (model.head_dim + 1)


def routed_layer_bytes_per_token(model, e: int) -> float:
    """A Mixture-of-Depths block in training: the block runs on C = ceil(capacity·S) tokens per segment
    (local attention over C), plus the gathered tokens and the routed difference (2·e·D each routed
    token); every token keeps the router's input (e·D), its logit and the BCE target (8)."""
    C = model.mod_tokens_per_segment()
    frac = C / model.segment_len
    return frac * (layer_bytes_per_token(model, e, segment_len=C, rope_tables=4) + 2 * e * model.d_model) \
        + e * model.d_model + 8


def _layers(model, e: int) -> list[tuple[float, float]]:
    """(bytes per token, bytes per segment) of each layer, in order."""
    out = []
    for i in range(model.n_layers):
        if model.is_routed(i):
            out.append((routed_layer_bytes_per_token(model, e), segment_bytes(model)))
        else:
            out.append((layer_bytes_per_token(model, e), segment_bytes(model)))
    return out


def traced_block_bytes(model, e: int, batch: int, tokens: int) -> int:
    """MEGALODON: bytes of the distinct storages autograd saves for one block over (batch, tokens), as the trainer
    calls it (doc_start given, none inside a chunk), traced on the meta device; parameters excluded."""
    import torch

    from infinitrain.model.megalodon import MegalodonBlock

    dtype = torch.bfloat16 if e == 2 else torch.float32
    with torch.device("meta"):
        block = MegalodonBlock(model).to(dtype).train()
        x = torch.empty(batch, tokens, model.d_model, dtype=dtype, requires_grad=True)
        doc_start = torch.zeros(batch, tokens, dtype=torch.bool)
    skip = {p.untyped_storage()._cdata for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, None, doc_start=doc_start, doc_inside=False)
    return sum(seen.values())


def state_bytes(model) -> int:
    """One layer's carried state per row: (M, z) fp32 per KV head (Infini), or the complex64 CEMA state and the
    timestep-norm count, mean and variance (MEGALODON)."""
    if model.arch == "megalodon":
        return 8 * model.d_model * model.ema_dim + 8 * model.norm_groups + 8
    return model.n_kv_heads * model.head_dim * (model.head_dim + 1) * 4


def head_bytes(m, e: int, T: int) -> int:
    """What the fused head + loss keeps for backward over T tokens: the final norm's input, scale and output, the
    hidden states' gradient, the norm's fp32 copy below fp32, and the head's gradient."""
    return (3 * e * m.d_model + 4 + (4 * m.d_model if e < 4 else 0)) * T + e * m.vocab_size * m.d_model


def _megalodon_activation_bytes(cfg, e: int) -> tuple[float, str, float, str]:
    m = cfg.model
    B, W, S = cfg.data.micro_batch_size, cfg.window, m.segment_len
    T = B * W * S
    head_in = head_bytes(m, e, T)
    window, segment = traced_block_bytes(m, e, B, W * S), traced_block_bytes(m, e, B, S)
    mode = cfg.tbptt.checkpointing
    if mode == "none":
        return m.n_layers * window + head_in, "L·M(B, W·S) + (3e·D + 4)·T + e·V·D [head]", window, "M(B, W·S)"
    if mode == "layer":
        return (m.n_layers * e * m.d_model * T + window + head_in,
                "L·e·D·T + M(B, W·S) [one layer recomputed] + (3e·D + 4)·T + e·V·D [head]", window, "M(B, W·S)")
    kept = m.n_layers * (e * m.d_model * T + W * B * state_bytes(m)) + segment + head_in
    return (kept, "L·(e·D·T + W·B·state) + M(B, S) [one layer-segment recomputed] + (3e·D + 4)·T + e·V·D [head]",
            segment, "M(B, S)")


def activation_bytes(cfg, e: int | None = None) -> tuple[float, str, float, str]:
    """(bytes kept, formula, backward working set, formula) of one backward under the recipe's checkpointing.

    The working set is the gradient side of the unit being differentiated (a layer, or a layer-segment under
    segment checkpointing): about its activations again (the fused attention kernel's backward works tile by
    tile, so no S×S gradients come on top)."""
    m = cfg.model
    e = e or (2 if cfg.run.precision in ("bf16", "auto") else 4)  # auto: bf16 on the GPUs planned for
    if m.arch == "megalodon":
        return _megalodon_activation_bytes(cfg, e)
    B, W, S = cfg.data.micro_batch_size, cfg.window, m.segment_len
    T = B * W * S
    layers = _layers(m, e)
    head_in = head_bytes(m, e, T)
    # the RoPE table: with the layer (or layer-segment) whose activations are held, whichever mode
    head_in += rope_table_bytes(m) if any(not m.is_routed(i) for i in range(m.n_layers)) else 0
    state_in = B * m.n_kv_heads * m.head_dim * (m.head_dim + 1) * 4  # one layer's (M, z)
    a, a_seg = max(layers)
    mode = cfg.tbptt.checkpointing
    if mode == "none":
        kept = sum(T * a_ + B * W * s_ for a_, s_ in layers) + head_in
        return kept, "Σ_layers (T·A + B·W·A_seg) + (3e·D + 4)·T + e·V·D [head] + 8·S·R", T * a, "T·A"
    if mode == "layer":
        kept = m.n_layers * e * m.d_model * T + T * a + B * W * a_seg + head_in
        return (kept, "L·e·D·T + (T·A + B·W·A_seg) [one layer recomputed] + (3e·D + 4)·T + e·V·D [head] + 8·S·R",
                T * a, "T·A")
    kept = m.n_layers * (e * m.d_model * T + W * state_in) + B * S * a + B * a_seg + head_in
    return (kept, "L·(e·D·T + W·B·G·K(K+1)·4) + (B·S·A + B·A_seg) [one layer-segment recomputed] "
            "+ (3e·D + 4)·T + e·V·D [head] + 8·S·R", B * S * a, "B·S·A")


# --- the plan ----------------------------------------------------------------------------------------------


def _ds_setting(ds: dict[str, Any], key: str) -> float:
    return float(ds.get("zero_optimization", {}).get(key, DS_DEFAULTS[key]))


def _param_stats(model) -> tuple[int, int, list[int]]:
    """(Ψ, the largest single module's own parameters, every parameter's size)."""
    import torch

    from infinitrain.model.lm import InfiniLM

    with torch.device("meta"):
        net = InfiniLM(model)
    numels = [p.numel() for p in net.parameters()]
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in net.modules())
    return sum(numels), largest, numels


def plan(cfg, *, gpus: int, nodes: int = 1, gpu_memory: float = 80 * GB, title: str = "") -> Plan:
    """The per-GPU memory of training ``cfg`` (a TrainConfig) data-parallel on ``gpus`` GPUs."""
    from infinitrain.train.engine import deepspeed_config

    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ConfigError(f"--gpus ({gpus}) must be a positive multiple of --nodes ({nodes})")
    m, run = cfg.model, cfg.run
    N, stage = gpus, run.zero_stage
    e = 2 if run.precision in ("bf16", "auto") else 4
    ds = deepspeed_config(cfg, N, cuda=True)  # the GPU run being planned
    psi, largest, numels = _param_stats(m)
    persist = sum(n for n in numels if n <= _ds_setting(ds, "stage3_param_persistence_threshold")) if stage == 3 else 0
    grad_e = {"fp32": 4, "bf16": 2, "fp16": 2}.get(str(ds.get("data_types", {}).get("grad_accum_dtype", "")), e)
    opt_k = 12 if e == 2 else 8

    def part(s: int) -> str:  # "/N" where ZeRO stage s partitions the term
        return "/N" if stage >= s else ""

    terms = [
        Term(f"parameters ({run.precision})", e * (psi / N + persist) if stage == 3 else e * psi,
             f"{e}·Ψ/N + {e}·Ψ_persistent" if stage == 3 else f"{e}·Ψ"),
        Term(f"gradients ({'bf16' if grad_e == 2 else 'fp32'})", grad_e * psi / (N if stage >= 2 else 1),
             f"{grad_e}·Ψ{part(2)}"),
        Term("optimizer states" + (" (fp32 master, Adam m, v)" if e == 2 else " (Adam m, v)"),
             opt_k * psi / (N if stage >= 1 else 1), f"{opt_k}·Ψ{part(1)}"),
    ]
    act, act_formula, work, work_formula = activation_bytes(cfg, e)
    B, W, S, V = cfg.data.micro_batch_size, cfg.window, m.segment_len, m.vocab_size
    T = B * W * S
    mega = m.arch == "megalodon"
    terms += [
        Term(f"activations (checkpointing {cfg.tbptt.checkpointing})", act, act_formula, "backward"),
        Term("backward working set", work, work_formula + "  [one unit's gradients]", "backward"),
        Term("memory states (CEMA, norm statistics)" if mega else "memory states (M, z), fp32",
             2 * m.n_layers * B * state_bytes(m),
             ("2·L·B·(8·D·h + 8·groups + 8)" if mega else "2·L·B·G·K·(K+1)·4") + "  [carried in and out of a window]",
             "backward"),
        Term("logits and loss (one segment)", B * S * V * (2 * e + 12),
             "B·S·V·(2e + 12)  [per segment at the end of forward: logits, fp32 log-softmax, its gradient, "
             "the logits' gradient]", "backward"),
    ]
    if stage == 3:
        prefetch, bucket = _ds_setting(ds, "stage3_prefetch_bucket_size"), _ds_setting(ds, "reduce_bucket_size")
        terms.append(Term("ZeRO-3 buffers", e * (2 * largest + min(prefetch, psi)) + grad_e * bucket,
                          f"{e}·(2·P_max + min(prefetch, Ψ)) + {grad_e}·reduce_bucket  [the gathered largest module "
                          f"and its full gradient, prefetch {prefetch:.0e}, reduce bucket {bucket:.0e}]", "backward"))
        terms.append(Term("optimizer step: fp32 gradient copy", 4 * psi / N, "4·Ψ/N  [flattened for the step]",
                          "step"))
    else:
        terms.append(Term("largest module's full gradient", grad_e * largest, f"{grad_e}·P_max", "backward"))
        terms.append(Term("optimizer step: fp32 gradient copy", 4 * psi / (N if stage >= 1 else 1) if e == 2 else 0,
                          f"4·Ψ{part(1)} (mixed precision only)", "step"))
    per_layer = (f"M(B, S) = {traced_block_bytes(m, e, B, S) / 1e6:.1f} MB (one block over one segment, traced)" if mega
                 else f"A = {layer_bytes_per_token(m, e) / 1e3:.1f} KB/token, A_seg = {segment_bytes(m) / 1e6:.2f} MB")
    notes = (f"P_max = {largest / 1e6:.1f} M (largest module's own parameters), {per_layer}",
             "the figures are tensor bytes per device; on a CPU the process's RSS adds the interpreter, torch and "
             "DeepSpeed and the allocator's slack (SmolLM2-135M, fp32, 4K samples: plan 5.35 GB, max RSS 7.8 GB)")
    per_step = B * cfg.data.grad_accum * N * cfg.sample_len
    return Plan(title, gpus, nodes, gpu_memory, psi, tuple(terms), T, per_step, notes)


def format_plan(p: Plan, cfg) -> str:
    m = cfg.model
    lines = [f"{p.title}: {p.gpus} GPU{'s' if p.gpus > 1 else ''}"
             + (f" ({p.nodes} nodes x {p.gpus // p.nodes})" if p.nodes > 1 else "")
             + f", ZeRO-{cfg.run.zero_stage}, {cfg.run.precision}, checkpointing {cfg.tbptt.checkpointing}",
             (f"model: Ψ = {p.params / 1e9:.3f} B, L {m.n_layers}, D {m.d_model}, heads {m.n_heads}/{m.n_kv_heads} x "
              f"{m.head_dim}, FFN {m.d_ff}, V {m.vocab_size}, S {m.segment_len}")
             + (f", MoD every {m.mod_every} at {m.mod_capacity:g}" if m.mod_every else ""),
             (f"tokens: T = B {cfg.data.micro_batch_size} x W {cfg.window} x S {m.segment_len} = "
              f"{p.tokens_per_backward:,} per backward; {p.tokens_per_step:,} per optimizer step (B x accum "
              f"{cfg.data.grad_accum} x {p.gpus} GPUs x {cfg.data.segments_per_sample} x {m.segment_len})"),
             "", f"{'term':44s} {'GB/GPU':>8s}  formula"]
    for t in p.terms:
        tag = {"always": "", "backward": " *", "step": " +"}[t.when]
        lines.append(f"{t.name + tag:44s} {t.bytes / GB:8.2f}  {t.formula}")
    verdict = ("fits" if p.fits else "tight: above 90% of" if p.peak <= p.gpu_memory else "does NOT fit in")
    lines += [f"{'peak per GPU':44s} {p.peak / GB:8.2f}  held + max(* during a backward, + during the step)",
              f"verdict: {verdict} {p.gpu_memory / GB:.0f} GB" + (
                  f" ({p.peak / p.gpu_memory:.0%}; 10% kept for the CUDA context and fragmentation)")]
    if not p.fits:
        lines.append(f"advice: {advice(p)}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


SHARDED = ("parameters", "gradients", "optimizer states", "optimizer step")  # the terms ZeRO divides by N


def advice(p: Plan) -> str:
    """What to change when a plan does not fit: the largest term, and whether more GPUs shrink it."""
    phase = "step" if sum(t.bytes for t in p.terms if t.when == "step") > sum(
        t.bytes for t in p.terms if t.when == "backward") else "backward"
    big = max((t for t in p.terms if t.when in ("always", phase)), key=lambda t: t.bytes)
    if big.name.startswith(SHARDED):
        return f"the largest term is {big.name} ({big.bytes / GB:.1f} GB): more GPUs (or a higher ZeRO stage) shrink it"
    return (f"the largest term is {big.name} ({big.bytes / GB:.1f} GB), which more GPUs do not shrink: lower "
            "tbptt.window or data.micro_batch_size (T = B·W·S tokens per backward), or checkpoint more")


@click.command("plan")
@click.option("--recipe", required=True, help="Shipped recipe name or a path to a recipe .yaml.")
@click.argument("overrides", nargs=-1, metavar="[KEY.SUB=VALUE]...")
@click.option("--stage", default=None, help="Plan this stage [default: every stage of a staged recipe].")
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="GPUs in total (the data-parallel size).")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes they are spread over (shown; the memory per GPU does not depend on it).")
@click.option("--gpu-memory", default="80GB", show_default=True, help="Memory of one GPU: 80GB = 80 = 80e9 bytes "
              "(a bare number is GB), or 80GiB.")
def plan_cmd(recipe: str, overrides: tuple[str, ...], stage: str | None, gpus: int, nodes: int,
             gpu_memory: str) -> None:
    """Per-GPU memory (ZeRO states, activations, memory states, buffers) and tokens per step of a recipe."""
    from pathlib import Path

    from infinitrain.train.config import (
        load_recipe,
        load_yaml,
        recipe_path,
        recipe_stages,
    )
    from infinitrain.export import parse_size

    path = recipe_path(recipe)
    stages = [stage] if stage is not None else list(recipe_stages(load_yaml(path), str(path))) or [None]
    memory = parse_size(gpu_memory, what="--gpu-memory", bare="gb")
    blocks = []
    for s in stages:
        cfg = load_recipe(recipe, overrides, stage=s)
        title = f"plan {Path(recipe).stem}" + (f", stage {s}" if s else "")
        blocks.append(format_plan(plan(cfg, gpus=gpus, nodes=nodes, gpu_memory=memory, title=title), cfg))
    click.echo("\n\n".join(blocks))
