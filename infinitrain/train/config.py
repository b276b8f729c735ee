"""Run configuration: frozen, validated dataclasses built from a recipe (YAML) plus ``key.sub=value`` overrides.

Recipe schema (every key optional except ``model``; see ``infinitrain/recipes/debug.yaml``)::

    model: debug                  # a preset name, or a mapping: {preset: debug, segment_len: 32, ...}
                                  # or a full ModelConfig mapping without ``preset``
    data:      {path, segments_per_sample, micro_batch_size, grad_accum, val_fraction, val_samples, seed}
               # path: a prepared shard dir or text, or a weighted mixture of them, either form:
               #   {data/pg19: 0.5, data/arxiv: 0.5}  or  {pg19: {path: data/pg19, weight: 0.5}, ...}
               # (infinitrain/data_tools/mixture.py: sampling, resume; per-dataset tokens/loss in metrics)
    optim:     {lr, gate_lr, tau_lr, weight_decay, beta1, beta2, eps, grad_clip}
    schedule:  {steps, warmup, min_lr_ratio}
    tbptt:     {window, checkpointing: none|layer|segment, mod_aux_weight}
    checkpoint:{save_every, keep_last}
    log:       {every, eval_every, tensorboard, progress}
    run:       {precision: bf16|fp32|auto, zero_stage: 0-3, zero_init: auto|true|false, seed,
                max_nonfinite, deterministic, init_from, timeout_s}
    eval:      {task: passkey|ppl|summarize|classify|null, data, lengths, temperature, top_p, max_new_tokens}
    task:      lm | classification  # classification: a class head read at each sample's labelled position
                                    # (infinitrain/train/tasks.py; the class names come from the data's index)
    finetune:  {lora: {rank, alpha, dropout, targets}, gates, memory, freeze, train}   # infinitrain/train/finetune.py
    deepspeed: {}                 # merged last into the generated DeepSpeed config (pass-through)
    stages:                       # optional: named stages run one by one (``train --stage NAME``)
      pretrain: {data: {path: data/long-8k}, schedule: {steps: 30000}, run: {init_from: models/Llama-3-8B}}
      finetune: {data: {path: data/booksum}, run: {init_from: "stage:pretrain"}}

A stage is a mapping of the same keys, deep-merged over the base (everything but ``stages``); the CLI's
overrides come after it. ``run.init_from: stage:NAME`` names an earlier stage's run directory: the sibling
``NAME`` of this stage's run directory (``runs/<recipe>/<stage>`` by default).

Overrides are trailing ``key.sub=value`` tokens; the value is parsed as YAML (``1e-3``, ``[0.9, 0.95]``,
``null``). An unknown key anywhere but under ``deepspeed`` is a ``ConfigError`` naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from infinitrain.errors import ConfigError
from infinitrain.model.config import ModelConfig, get_preset
from infinitrain.train.finetune import FinetuneConfig

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
CHECKPOINTING = ("none", "layer", "segment")
PRECISIONS = ("bf16", "fp32")  # the dtypes a run trains in
RUN_PRECISIONS = (*PRECISIONS, "auto")  # run.precision: auto = bf16 where the device computes it (hardware.py)
EVAL_TASKS = ("passkey", "ppl", "summarize", "classify")
TASKS = ("lm", "classification")
STAGE_REF = "stage:"  # run.init_from: stage:NAME = the run directory of an earlier stage


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean X?"`` for the closest of ``choices`` to a misspelt ``word``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _from_dict(cls, d: Any, where: str):
    """Build a section dataclass from a mapping; unknown keys and wrong types are one-line ConfigErrors."""
    if d is None:
        d = {}
    _check(isinstance(d, dict), f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    _check(not unknown, f"{where}: unknown key {where}.{unknown[0] if unknown else ''!s} (known: "
                        f"{', '.join(sorted(known))}){did_you_mean(unknown[0], known) if unknown else ''}")
    try:
        return cls(**d)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _positive_int(where: str, value: Any, zero_ok: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    _check(ok, f"{where} must be a {'non-negative' if zero_ok else 'positive'} integer, got {value!r}")


def _number(where: str, value: Any, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    _check(ok, f"{where} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str | dict | None = None  # shard dir, text file or dir of .txt (byte-level ids), or a mixture; --data
    segments_per_sample: int = 4  # N: a sample is N * segment_len tokens
    micro_batch_size: int = 2  # samples per rank per micro-batch
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    val_fraction: float = 0.05  # text sources: tail of the corpus held out for validation
    val_samples: int = 16  # validation samples evaluated (in order, sharded over ranks; per dataset of a mixture)
    seed: int = 0  # shuffle seed of the sampler
    # summarization/QA shards: pack several samples per row of segments_per_sample segments (each its own
    # document, on a segment boundary), so short samples are not padded to a whole row; a row is then the unit of
    # micro_batch_size (train/packing.py)
    pack: bool = True

    def __post_init__(self) -> None:
        for name in ("segments_per_sample", "micro_batch_size", "grad_accum", "val_samples"):
            _positive_int(f"data.{name}", getattr(self, name))
        _number("data.val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        _positive_int("data.seed", self.seed, zero_ok=True)
        _check(isinstance(self.pack, bool), f"data.pack must be true or false, got {self.pack!r}")
        _check(self.path is None or isinstance(self.path, (str, dict)), f"data.path must be a string or a mixture "
                                                                         f"mapping, got {self.path!r}")
        if isinstance(self.path, dict):
            from infinitrain.data_tools.mixture import parse_mixture

            parse_mixture(self.path)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    gate_lr: float = 1e-2  # the per-head gates β (HF's reproduction: β barely moves at the global lr)
    # the memory temperatures log τ (model.memory_tau), no weight decay; null: lr. A run that freezes the
    # pretrained weights (lr 3e-5) needs its own: there τ barely moved (1.0 -> 1.00008 in 3 steps)
    tau_lr: float | None = None
    weight_decay: float = 0.1  # not applied to gates, norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # always passed to DeepSpeed (its default changed to 1.0 in 0.19.3); 0 = off

    def __post_init__(self) -> None:
        _number("optim.lr", self.lr, 0.0, lo_open=True)
        _number("optim.gate_lr", self.gate_lr, 0.0)
        if self.tau_lr is not None:
            _number("optim.tau_lr", self.tau_lr, 0.0)
        _number("optim.weight_decay", self.weight_decay, 0.0)
        _number("optim.beta1", self.beta1, 0.0, 1.0)
        _number("optim.beta2", self.beta2, 0.0, 1.0)
        _number("optim.eps", self.eps, 0.0, lo_open=True)
        _number("optim.grad_clip", self.grad_clip, 0.0)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    steps: int = 1000  # optimizer steps of the run
    warmup: int = 100  # linear warmup steps, then cosine down to min_lr_ratio * lr at ``steps``
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _positive_int("schedule.steps", self.steps)
        _positive_int("schedule.warmup", self.warmup, zero_ok=True)
        _number("schedule.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclass(frozen=True, kw_only=True)
class TBPTTConfig:
    window: int = 0  # W segments per backward; 0 = the whole sample (full BPTT)
    checkpointing: Literal["none", "layer", "segment"] = "none"
    mod_aux_weight: float = 0.01  # weight of the Mixture-of-Depths router BCE in the loss

    def __post_init__(self) -> None:
        _positive_int("tbptt.window", self.window, zero_ok=True)
        _check(self.checkpointing in CHECKPOINTING,
               f"tbptt.checkpointing must be one of {', '.join(CHECKPOINTING)}; got {self.checkpointing!r}")
        _number("tbptt.mod_aux_weight", self.mod_aux_weight, 0.0)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    save_every: int = 0  # steps between checkpoints; 0 = only at the end and on SIGTERM/SIGINT
    keep_last: int = 2  # committed checkpoints kept (older ones pruned); 0 = keep all

    def __post_init__(self) -> None:
        _positive_int("checkpoint.save_every", self.save_every, zero_ok=True)
        _positive_int("checkpoint.keep_last", self.keep_last, zero_ok=True)


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    every: int = 10  # steps between metrics.jsonl rows
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    tensorboard: bool = True  # when tensorboard is installed
    progress: bool = True  # rank-0 tqdm bar

    def __post_init__(self) -> None:
        _positive_int("log.every", self.every)
        _positive_int("log.eval_every", self.eval_every, zero_ok=True)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    precision: Literal["bf16", "fp32", "auto"] = "bf16"  # the trainer resolves auto once, config.yaml records it
    zero_stage: int = 3
    zero_init: Literal["auto", True, False] = "auto"  # auto: deepspeed.zero.Init for stage 3 and >= 0.5 B params
    seed: int = 0  # model init and per-rank RNG
    max_nonfinite: int = 5  # consecutive skipped (non-finite) steps before the run aborts
    deterministic: bool = True  # torch.use_deterministic_algorithms (bitwise resume on CPU)
    # start from these weights (not on resume): a Hugging Face Llama dir, an exported model dir, a run dir,
    # or ``stage:NAME`` (an earlier stage's run dir); see infinitrain/train/init_from.py
    init_from: str | None = None
    timeout_s: float = 1800.0  # collectives: a dead or hung peer stops the run after this (exit 8)

    def __post_init__(self) -> None:
        _check(self.precision in RUN_PRECISIONS, f"run.precision must be one of {', '.join(RUN_PRECISIONS)}; "
                                             f"got {self.precision!r}")
        _check(self.zero_stage in (0, 1, 2, 3) and not isinstance(self.zero_stage, bool),
               f"run.zero_stage must be 0, 1, 2 or 3; got {self.zero_stage!r}")
        _check(self.zero_init in ("auto", True, False), f"run.zero_init must be auto, true or false; "
                                                          f"got {self.zero_init!r}")
        _positive_int("run.seed", self.seed, zero_ok=True)
        _positive_int("run.max_nonfinite", self.max_nonfinite)
        _check(isinstance(self.deterministic, bool), "run.deterministic must be true or false")
        _number("run.timeout_s", self.timeout_s, 0.0, lo_open=True)
        _check(self.init_from is None or (isinstance(self.init_from, str) and self.init_from.strip() != ""),
               f"run.init_from must be a directory path or stage:NAME, got {self.init_from!r}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How the recipe's model is evaluated after training (``infinitrain eval TASK``; printed at the end of a run)."""

    task: Literal["passkey", "ppl", "summarize", "classify"] | None = None
    data: str | None = None  # ppl: shards or text; summarize: JSONL with document and summary
    lengths: list[int] | None = None  # passkey: context lengths in tokens
    temperature: float = 0.5  # summarize decoding (the paper: 0.5, top-p 0.95, 1024 new tokens)
    top_p: float = 0.95
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        _check(self.task is None or self.task in EVAL_TASKS,
               f"eval.task must be one of {', '.join(EVAL_TASKS)} or null; got {self.task!r}")
        _check(self.data is None or isinstance(self.data, str), f"eval.data must be a path, got {self.data!r}")
        _check(self.lengths is None or (isinstance(self.lengths, list) and bool(self.lengths)),
               f"eval.lengths must be a non-empty list of token counts, got {self.lengths!r}")
        for n in self.lengths or ():
            _positive_int("eval.lengths[]", n)
        _number("eval.temperature", self.temperature, 0.0)
        _number("eval.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _positive_int("eval.max_new_tokens", self.max_new_tokens)

    def command(self, model_dir: str, device: str | None = None, dtype: str | None = None) -> str | None:
        """The ``infinitrain eval`` command line these settings stand for (None without a task); ``device`` and
        ``dtype``: the run's, so the evaluation runs where and how the model was trained."""
        if self.task is None:
            return None
        cmd = ["infinitrain", "eval", self.task, model_dir]
        cmd += [*(["--device", device] if device else []), *(["--dtype", dtype] if dtype else [])]
        if self.data is not None and self.task != "passkey":
            cmd += ["--data", self.data]
        if self.task == "passkey" and self.lengths:
            cmd += ["--lengths", ",".join(str(n) for n in self.lengths)]
        if self.task == "summarize":
            cmd += ["--temperature", f"{self.temperature:g}", "--top-p", f"{self.top_p:g}",
                    "--max-new-tokens", str(self.max_new_tokens)]
        return " ".join(cmd)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "tbptt": TBPTTConfig,
            "checkpoint": CheckpointConfig, "log": LogConfig, "run": RunConfig, "eval": EvalConfig,
            "finetune": FinetuneConfig}
TOP_KEYS = ("model", "task", "deepspeed", *SECTIONS)  # what a recipe (and each stage) may hold


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run needs. ``to_dict()`` is the resolved recipe (``run_dir/config.yaml``)."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tbptt: TBPTTConfig = field(default_factory=TBPTTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    task: Literal["lm", "classification"] = "lm"
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = self.data.segments_per_sample
        _check(self.tbptt.window <= N, f"tbptt.window ({self.tbptt.window}) must be <= data.segments_per_sample ({N})")
        _check(self.schedule.warmup <= self.schedule.steps,
               f"schedule.warmup ({self.schedule.warmup}) must be <= schedule.steps ({self.schedule.steps})")
        _check(isinstance(self.deepspeed, dict), "deepspeed: expected a mapping")
        _check(self.task in TASKS, f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        _check(self.task == "classification" or self.model.labels is None,
               "model.labels is set: a classifier's recipe needs task: classification")

    # --- derived ---------------------------------------------------------------------------
    @property
    def window(self) -> int:
        """W, segments per backward (the whole sample when tbptt.window is 0)."""
        return self.tbptt.window or self.data.segments_per_sample

    @property
    def n_windows(self) -> int:
        return math.ceil(self.data.segments_per_sample / self.window)

    @property
    def sample_len(self) -> int:
        return self.data.segments_per_sample * self.model.segment_len

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model.to_dict()}
        for name in SECTIONS:
            d[name] = dataclasses.asdict(getattr(self, name))
        d["task"] = self.task
        d["deepspeed"] = copy.deepcopy(self.deepspeed)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        _check(isinstance(d, dict), f"recipe: expected a mapping at the top level, got {type(d).__name__}")
        unknown = sorted(set(d) - set(TOP_KEYS))
        _check(not unknown,
               f"recipe: unknown key {unknown[0] if unknown else ''!s} (known: {', '.join(sorted(TOP_KEYS))})")
        _check("model" in d, "recipe: 'model' is required (a preset name or a mapping)")
        sections = {name: _from_dict(sec, d.get(name), name) for name, sec in SECTIONS.items()}
        return cls(model=_model_from(d["model"]), deepspeed=dict(d.get("deepspeed") or {}), task=d.get("task", "lm"),
                   **sections)

    def replace(self, **sections: Any) -> "TrainConfig":
        return dataclasses.replace(self, **sections)


def _model_from(m: Any) -> ModelConfig:
    if isinstance(m, str):
        return get_preset(m)
    _check(isinstance(m, dict), f"model: expected a preset name or a mapping, got {type(m).__name__}")
    m = dict(m)
    preset = m.pop("preset", None)
    if preset is None:
        return ModelConfig.from_dict(m, where="model")
    base = get_preset(preset).to_dict()
    unknown = sorted(set(m) - set(base) - {"extra"})
    _check(not unknown,
           f"model: unknown key model.{unknown[0] if unknown else ''} (known: preset, {', '.join(sorted(base))})"
                        f"{did_you_mean(f'model.{unknown[0]}', [f'model.{k}' for k in base]) if unknown else ''}")
    return ModelConfig.from_dict({**base, **m}, where="model")


# --- recipes and overrides ------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; accept it (and ``1E5``, ``.5e2``) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def shipped_recipes() -> list[Path]:
    """Every ``*.yaml`` in the recipes folder, by name."""
    return sorted(RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe name (``debug``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        _check(p.is_file(), f"recipe file not found: {p}")
        return p
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(q.stem for q in shipped_recipes())
        raise ConfigError(f"unknown recipe {name_or_path!r} (shipped: {names}; or give a path to a .yaml file)"
                          f"{did_you_mean(name_or_path, [q.stem for q in shipped_recipes()])}")
    return shipped


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        d = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    _check(isinstance(d, dict), f"{path}: a recipe must be a YAML mapping")
    return d


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, mappings merged key by key (copies; neither input is changed)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def recipe_stages(d: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The recipe's ``stages:`` block (in order), each stage checked for unknown keys; {} without stages."""
    stages = d.get("stages")
    if stages is None:
        return {}
    _check(isinstance(stages, dict) and bool(stages), f"{where}: stages must be a non-empty mapping of name: overrides")
    known = set(TOP_KEYS)
    for name, body in stages.items():
        _check(isinstance(name, str) and bool(_STAGE_NAME.fullmatch(name)),
               f"{where}: stage name {name!r} must be letters, digits, '.', '_' or '-' (it names a run directory)")
        _check(isinstance(body, dict), f"{where}: stages.{name} must be a mapping of recipe keys")
        unknown = sorted(set(body) - known)
        _check(not unknown, f"{where}: stages.{name}: unknown key {unknown[0] if unknown else ''} "
                            f"(known: {', '.join(sorted(known))})")
    return dict(stages)


def stage_recipe(d: dict[str, Any], stage: str | None, where: str) -> tuple[dict[str, Any], str | None]:
    """(the base recipe with the stage's keys merged over it, the stage's name). ``stage`` None picks the
    first stage of a staged recipe; a recipe without stages has none."""
    stages = recipe_stages(d, where)
    base = {k: v for k, v in d.items() if k != "stages"}
    if not stages:
        _check(stage is None, f"{where}: recipe has no stages (asked for stage {stage!r})")
        return base, None
    names = list(stages)
    stage = names[0] if stage is None else stage
    _check(stage in stages, f"{where}: unknown stage {stage!r} (stages: {', '.join(names)})")
    body = stages[stage]
    if isinstance(body.get("model"), dict) and isinstance(base.get("model"), str):
        base["model"] = {"preset": base["model"]}
    return deep_merge(base, body), stage


def _check_stage_ref(cfg: "TrainConfig", d: dict[str, Any], stage: str | None, where: str) -> None:
    ref = cfg.run.init_from
    if ref is None or not ref.startswith(STAGE_REF):
        return
    names = list(recipe_stages(d, where))
    earlier = names[:names.index(stage)] if stage in names else []
    _check(ref[len(STAGE_REF):] in earlier, f"{where}: run.init_from {ref!r} must name an earlier stage of the "
                                            f"recipe (before {stage or 'this one'}: {', '.join(earlier) or 'none'})")


def resolve_stage_ref(cfg: "TrainConfig", run_dir: str | Path) -> "TrainConfig":
    """``run.init_from: stage:NAME`` -> the sibling directory NAME of ``run_dir`` (stages share a parent)."""
    ref = cfg.run.init_from
    if ref is None or not ref.startswith(STAGE_REF):
        return cfg
    target = str(Path(run_dir).parent / ref[len(STAGE_REF):])
    return cfg.replace(run=dataclasses.replace(cfg.run, init_from=target))


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` tokens applied to the raw recipe; unknown keys are caught when sections are built."""
    d = copy.deepcopy(d)
    for token in overrides:
        key, sep, raw = token.partition("=")
        _check(bool(sep) and bool(key) and all(key.split(".")), f"override {token!r}: expected key.sub=value")
        try:
            value = parse_yaml(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if parts[0] == "model" and isinstance(d.get("model"), str):
            d["model"] = {"preset": d["model"]}
        _check(parts[0] in TOP_KEYS, f"override {token!r}: unknown key {parts[0]} (known: {', '.join(TOP_KEYS)})"
                                     f"{did_you_mean(parts[0], TOP_KEYS)}")
        if len(parts) > 1 and parts[0] in SECTIONS:
            names = {f.name for f in dataclasses.fields(SECTIONS[parts[0]])}
            _check(parts[1] in names and len(parts) == 2,
                   f"override {token!r}: unknown key {key} (known: {', '.join(sorted(names))})"
                   f"{did_you_mean(f'{parts[0]}.{parts[1]}', (f'{parts[0]}.{n}' for n in names))}")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return d


def _keep_warmup_share(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A ``schedule.steps`` below the recipe's warmup (``debug`` warms up for 30 steps: ``schedule.steps=10``)
    keeps the recipe's warmup share of its steps instead of failing; a warmup given as an override stays as given."""
    default = ScheduleConfig()
    before, after = d.get("schedule") or {}, apply_overrides(d, overrides).get("schedule") or {}
    old_steps, steps = before.get("steps", default.steps), after.get("steps", default.steps)
    warmup = after.get("warmup", default.warmup)
    if any(o.startswith("schedule.warmup=") for o in overrides) or \
            not all(isinstance(x, int) and x > 0 for x in (old_steps, steps, warmup)) or warmup <= steps:
        return d
    return {**d, "schedule": {**before, "warmup": steps * warmup // old_steps}}


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), data: str | None = None,
                stage: str | None = None, with_stage: bool = False):
    """Recipe file -> its stage (the first one if ``stage`` is None) -> overrides -> ``--data`` -> TrainConfig
    (and, with ``with_stage``, the stage's name: None for a recipe without stages)."""
    path = recipe_path(name_or_path)
    raw = load_yaml(path)
    d, stage = stage_recipe(raw, stage, str(path))
    d = apply_overrides(_keep_warmup_share(d, list(overrides)), list(overrides))
    if data is not None:
        d.setdefault("data", {})
        d["data"] = {**(d["data"] or {}), "path": str(data)}
    cfg = TrainConfig.from_dict(d)
    _check_stage_ref(cfg, raw, stage, str(path))
    return (cfg, stage) if with_stage else cfg
