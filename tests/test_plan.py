"""``infinitrain plan``: the activation formula against the bytes autograd saves, the model states against a hand
computation, the estimate against the real trainer's measured peak RSS, and the CLI table and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from evalkit import run_main
from trainkit import REPO, TEXT

from infinitrain.errors import ConfigError
from infinitrain.model.config import ModelConfig, get_preset
from infinitrain.model.layers import Block, MoDBlock
from infinitrain.train.config import load_recipe
from infinitrain.plan import (
    GB,
    activation_bytes,
    layer_bytes_per_token,
    plan,
    rope_table_bytes,
    routed_layer_bytes_per_token,
    segment_bytes,
)


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


SHAPES = [  # d_model, n_heads, n_kv_heads, d_ff, segment_len, then extras; the first has H·K != D
    (96, 6, 2, 160, 40, {"head_dim": 24}), (64, 4, 4, 192, 64, {}), (60, 4, 1, 100, 24, {"activation": "swiglu"}),
    (60, 4, 2, 100, 24, {"activation": "gelu", "pos_emb": "none"}),
    (64, 4, 2, 96, 32, {"mod_every": 1, "mod_capacity": 0.25})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["hk-ne-d", "mha", "swiglu-mqa", "gelu-nope", "mod"])
def test_layer_formula_is_what_autograd_keeps(shape, dtype):
    """A·T + A_seg·B·N against one block called as the trainer calls it (doc_start given, no document starting
    inside a segment, so local attention takes the fused kernel): exact for dense blocks, within 4% for a
    Mixture-of-Depths block (index and routing bookkeeping not in the formula)."""
    D, H, G, F, S, extra = shape
    cfg = ModelConfig(vocab_size=256, n_layers=1, d_model=D, n_heads=H, n_kv_heads=G, d_ff=F, segment_len=S, **extra)
    e = 2 if dtype == torch.bfloat16 else 4
    B, N, S = 2, 3, cfg.segment_len
    block = (MoDBlock(cfg) if cfg.mod_every else Block(cfg)).to(dtype).train()
    x = torch.randn(B, N * S, cfg.d_model, dtype=dtype, requires_grad=True)
    got = saved_bytes(lambda: block(x, None, doc_start=torch.zeros(B, N * S, dtype=torch.bool)), block.parameters())
    per_token = routed_layer_bytes_per_token(cfg, e) if cfg.mod_every else layer_bytes_per_token(cfg, e)
    want = B * N * S * per_token + B * N * segment_bytes(cfg) + (0 if cfg.mod_every else rope_table_bytes(cfg))
    assert abs(want / got - 1) < (0.04 if cfg.mod_every else 0.001), (want, got)


@pytest.mark.parametrize("mode", ["none", "layer", "segment"])
def test_checkpointing_formula_is_what_the_model_keeps(mode):
    """The whole model and the chunked loss under each checkpointing mode (what a window's forward leaves for its
    backward, minus the one unit recomputed in backward: no logits); segment mode's kept (M, z) per layer and
    segment are held by the checkpoint's closure, which saved-tensor hooks do not see, so they are left out."""
    from infinitrain.model import InfiniLM
    from infinitrain.train.engine import apply_activation_checkpointing

    cfg = load_recipe("debug",
                      ["model.d_model=96", "model.n_heads=6", "model.segment_len=40", "data.micro_batch_size=2",
                                "data.segments_per_sample=3", "tbptt.window=3", f"tbptt.checkpointing={mode}"])
    m, B = cfg.model, cfg.data.micro_batch_size
    T = B * cfg.window * m.segment_len
    torch.manual_seed(0)
    model = InfiniLM(m)
    apply_activation_checkpointing(model, mode, m.segment_len)
    ids = torch.randint(0, m.vocab_size, (B, cfg.window * m.segment_len))

    def window():  # as the trainer calls it: the chunked loss, distinct targets and mask tensors
        model(ids, None, doc_start=torch.zeros(ids.shape, dtype=torch.bool), targets=ids.roll(-1, 1),
              loss_mask=torch.ones(ids.shape, dtype=torch.bool))

    got = saved_bytes(window, model.parameters())
    kept, _, _, _ = activation_bytes(cfg)
    A, A_seg = layer_bytes_per_token(m, 4), segment_bytes(m)
    recomputed = {"none": 0, "layer": T * A + B * cfg.window * A_seg,
                  "segment": B * m.segment_len * A + B * A_seg}[mode]
    unseen = m.n_layers * cfg.window * B * m.n_kv_heads * m.head_dim * (m.head_dim + 1) * 4 if mode == "segment" else 0
    recomputed += rope_table_bytes(m) if mode != "none" else 0  # read by the recomputed unit only
    want = kept - recomputed - unseen
    assert abs(want / got - 1) < 0.01, (want, got)


def test_model_states_and_tokens_by_hand():
    """8B (Llama-3-8B shape) ZeRO-3 bf16 on 64 GPUs, then fp32 and ZeRO-1/2, against numbers worked out here."""
    L, D, H, G, K, F, V = 32, 4096, 32, 8, 128, 14336, 128256
    psi = 2 * V * D + L * (2 * D * H * K + 2 * D * G * K + 3 * D * F + 2 * D + H) + D  # embed, head, blocks, norm
    assert psi == 8_030_261_248 + L * H  # Llama-3-8B plus one gate β per head
    base = ["model=8b", "data.micro_batch_size=1", "data.grad_accum=8", "data.segments_per_sample=4",
            "tbptt.window=1", "tbptt.checkpointing=layer"]
    recipe = REPO / "infinitrain" / "recipes" / "debug.yaml"

    def terms(*extra, gpus=64):
        cfg = load_recipe(str(recipe), [*base, *extra])
        p = plan(cfg, gpus=gpus)
        return {t.name.split(" (")[0]: t.bytes for t in p.terms}, p

    t, p = terms("run.precision=bf16", "run.zero_stage=3")
    persistent = L * (2 * D + H) + D  # norms and gates: under the 1e5 persistence threshold, kept whole
    assert t["parameters"] == 2 * (psi / 64 + persistent)
    assert t["gradients"] == 4 * psi / 64 and t["optimizer states"] == 12 * psi / 64  # fp32 accumulation
    A = 18 * H * K + 4 * H * (K + 1) + 12 * H + 12 * G * K + 16 * D + 8 * F + 10
    assert A == layer_bytes_per_token(get_preset("8b"), 2) == 283_146
    T = 1 * 1 * 2048
    rope_table = 8 * 2048 * K  # fp32 cos and sin of one segment's positions, held once
    head = (3 * 2 * D + 4 + 4 * D) * T + 2 * V * D  # fused loss: norm in/fp32 copy/scale/out, dx; the head's dW
    assert t["activations"] == L * 2 * D * T + T * A + 4 * H * K * (K + 1) + head + rope_table
    assert t["logits and loss"] == 2048 * V * 16  # one segment's, at the end of forward
    assert p.tokens_per_backward == 2048 and p.tokens_per_step == 1 * 8 * 64 * 4 * 2048
    held = t["parameters"] + t["gradients"] + t["optimizer states"]
    window = sum(v for k, v in t.items() if k not in ("parameters", "gradients", "optimizer states",
                                                      "optimizer step: fp32 gradient copy"))
    assert p.peak == held + max(window, t["optimizer step: fp32 gradient copy"])
    t, _ = terms("run.precision=fp32", "run.zero_stage=3")
    assert (t["gradients"], t["optimizer states"]) == (4 * psi / 64, 8 * psi / 64)
    t, _ = terms("run.precision=bf16", "run.zero_stage=2")
    assert (t["parameters"], t["gradients"], t["optimizer states"]) == (2 * psi, 4 * psi / 64, 12 * psi / 64)
    t, _ = terms("run.precision=bf16", "run.zero_stage=1")  # no fp32 accumulation below ZeRO-2
    assert (t["parameters"], t["gradients"], t["optimizer states"]) == (2 * psi, 2 * psi, 12 * psi / 64)


# The real trainer in a fresh process: after the engine is built (model, ZeRO partitions, optimizer states
# and gradient buffers allocated), reset the peak RSS (Linux: clear_refs 5), train one step, read VmHWM.
DRIVER = r"""
import ctypes, gc, json, sys
import torch
import infinitrain.train.loop as loop
from infinitrain.train.config import load_recipe

torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
base, real = {}, loop.build_engine
def build_engine(*a, **kw):
    out = real(*a, **kw)
    gc.collect()
    libc.malloc_trim(0)  # hand the previous mode's freed heap back, so that it is not reused unseen
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base["rss"] = status("VmRSS:")
    return out
loop.build_engine = build_engine
text, root, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
result = {}
for mode in ("none", "layer", "segment"):
    cfg = load_recipe("debug", [*overrides, f"tbptt.checkpointing={mode}"], text)
    loop.train(cfg, f"{root}/{mode}", "none")
    result[mode] = status("VmHWM:") - base["rss"]
print(json.dumps(result))
"""
# debug recipe with wider layers and 256-token segments: activations (not Python or the allocator) dominate
MEASURED = ["model.d_model=128", "model.segment_len=256", "model.d_ff=384", "data.segments_per_sample=2",
            "data.micro_batch_size=8", "tbptt.window=2", "schedule.steps=1", "schedule.warmup=0", "log.eval_every=0",
            "log.progress=false", "log.tensorboard=false", "checkpoint.save_every=0", "data.val_samples=8"]


def test_estimate_against_the_trainers_measured_peak(tmp_path):
    """Peak RSS growth of one real training step (fp32, ZeRO-3, 1 rank) against the plan's terms that appear
    during a window: activations, backward working set, memory states, logits and loss, ZeRO-3 buffers (the
    reduce bucket counted at the bytes a step touches: on CPU untouched pages of torch.empty are not
    resident). Runs on 2026-12-01 (a busy 2-core box), before the chunked loss and fused local attention: none
218-231 MB vs 274 estimated (0.80-0.84), layer 180-225 vs 213, segment 123-146 vs 131; after them (one run):
none 175 vs 172 (1.02), layer 131 vs 128 (1.02), segment 91 vs 79 (1.15). Allocator reuse moves the measure by
about 20% between runs, so the test asks for a factor 1.4 either way. Dropping the activations or the backward
working set breaks it in every mode (ratios 1.4-2.4 with that run), doubling the activations in none; the
per-tensor accounting is held exactly by the tests above."""
    check_estimate_against_measured_peak(tmp_path, MEASURED)


def check_estimate_against_measured_peak(tmp_path, overrides: list[str]) -> None:
    """Runs DRIVER on the debug recipe with ``overrides``; each mode's peak RSS growth within 1.4x of the plan."""
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-c", DRIVER, str(TEXT), str(tmp_path), json.dumps(overrides)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    for mode, growth in measured.items():
        cfg = load_recipe("debug", [*overrides, f"tbptt.checkpointing={mode}"])
        p = plan(cfg, gpus=1)
        psi, bucket = p.params, 5e8
        estimate = sum(t.bytes for t in p.terms if t.when == "backward") - 4 * (bucket - min(bucket, psi))
        print(f"{mode}: measured {growth / 1e6:.0f} MB, estimate {estimate / 1e6:.0f} MB")
        assert 1 / 1.4 < growth / estimate < 1.4, (mode, growth, estimate)


def test_cli_table_verdict_and_errors(tmp_path, capsys):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("model: 8b\ndata: {micro_batch_size: 1, segments_per_sample: 4}\n"
                      "tbptt: {window: 1, checkpointing: layer}\nrun: {precision: bf16, zero_stage: 3}\n"
                      "stages:\n  short: {}\n  long: {data: {segments_per_sample: 16}, tbptt: {checkpointing: none}}\n")
    code, out, err = run_main(["plan", "--recipe", str(recipe), "--gpus", "64", "--nodes", "8"], capsys)
    assert code == 0, err
    assert "stage short: 64 GPUs (8 nodes x 8), ZeRO-3, bf16" in out and "stage long" in out
    for needle in ("parameters (bf16)", "12·Ψ/N", "activations (checkpointing layer)", "memory states",
                   "ZeRO-3 buffers", "peak per GPU", "verdict: fits 80 GB"):
        assert needle in out, needle
    code, out, _ = run_main(["plan", "--recipe", str(recipe), "--stage", "long", "--gpus", "8",
                             "--gpu-memory", "24GB"], capsys)
    assert code == 0 and "verdict: does NOT fit in 24 GB" in out and "stage short" not in out
    code, bare, _ = run_main(["plan", "--recipe", str(recipe), "--stage", "long", "--gpus", "8",
                              "--gpu-memory", "24"], capsys)  # a bare number is GB (it read 24 bytes: "0 GB")
    assert code == 0 and bare == out
    for argv, needle in ((["--gpus", "6", "--nodes", "4"], "multiple of --nodes"),
                         (["--gpus", "8", "--stage", "nope"], "unknown stage"),
                         (["--gpus", "8", "--gpu-memory", "lots"], "--gpu-memory")):
        code, _, err = run_main(["plan", "--recipe", str(recipe), *argv], capsys)
        assert code == ConfigError.code and needle in err and err.strip().count("\n") == 0, err
    assert GB == 1e9


def test_documented_plan_outputs_are_current(capsys):
    """Every ``$ infinitrain plan ...`` block of docs/plan.md is what the command prints today."""
    import re
    import shlex

    plan_md = (REPO / "docs" / "plan.md").read_text()
    blocks = re.findall(r"```text\n\$ (infinitrain plan [^\n]*)\n(.*?)```", plan_md, re.DOTALL)
    assert len(blocks) >= 2
    for command, shown in blocks:
        code, out, err = run_main(shlex.split(command)[1:], capsys)
        assert code == 0, err
        assert out == shown, f"docs/plan.md output of `{command}` is stale: rerun it and paste it"


@pytest.mark.parametrize("path", sorted((REPO / "infinitrain" / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_plans(path):
    """Each stage of each shipped recipe gives a table on 8 GPUs, its model states 16Ψ/N bytes at ZeRO-3."""
    from infinitrain.train.config import load_yaml, recipe_stages
    from infinitrain.plan import format_plan

    for stage in list(recipe_stages(load_yaml(path), str(path))) or [None]:
        cfg = load_recipe(str(path), stage=stage)
        p = plan(cfg, gpus=8, title=path.stem)
        states = sum(t.bytes for t in p.terms[:3])
        if cfg.run.zero_stage == 3:
            assert states >= 16 * p.params / 8
        assert 0 < p.peak < 1e12 and "peak per GPU" in format_plan(p, cfg)
