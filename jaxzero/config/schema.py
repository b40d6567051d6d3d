"""Typed run config: one frozen dataclass per concern, built strictly from nested mappings.

Reading YAML files and command-line overrides into these is `config_yaml`."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from typing import Any, ClassVar, Literal, Union

from jaxzero.errors import ConfigError
from jaxzero.io.storage import REMOTE_SCHEMES

Dtype = Literal["float32", "bfloat16"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm", "seed-micro-token-mean"]
KlKind = Literal["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]


class _Section:
    """Checks and coerces every declared field (int -> float, list -> tuple), then `_validate`.

    Runs on direct construction as well as on loading, so a config built in Python is held to
    the same rules as one read from YAML.
    """

    section: ClassVar[str]  # the section's key in RunConfig, for dotted error messages

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], f"{self.section}.{f.name}")
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        pass

    def _require(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{key}={show_value(getattr(self, key))}: {rule}")

    def _at_least(self, bound: int, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            optional = type(None) in typing.get_args(_hints(type(self))[key])
            self._require(value is None or value >= bound, key,
                          f"must be at least {bound}{' (or null)' if optional else ''}")

    def _positive(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            self._require(value is None or value > 0, key, "must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    path: str | None = None  # HF model dir, jaxzero checkpoint dir, or HF hub id
    demo: bool = False       # build the tiny demo model on the fly instead of loading `path`
    demo_layers: int = 2
    demo_hidden: int = 64
    demo_heads: int = 4
    demo_kv_heads: int = 2
    demo_intermediate: int = 128
    param_dtype: Dtype = "bfloat16"
    compute_dtype: Dtype = "bfloat16"
    remat: Literal["none", "block"] = "block"
    tokenizer: str | None = None  # None: the tokenizer beside `path`
    # Attention of training passes and prefills: auto is cudnn on GPU, splash on TPU, einsum
    # on CPU; decode steps read the filled cache blocks with the einsum everywhere.
    attention: Literal["auto", "einsum", "xla", "cudnn", "splash"] = "auto"

    def _validate(self) -> None:
        if self.demo:
            # The demo has its own packaged model shape and tokenizer; a path would be ignored.
            self._require(self.path is None, "path", "must be null when model.demo is true")
            self._require(self.tokenizer is None, "tokenizer",
                          "must be null when model.demo is true (the demo ships its tokenizer)")
        else:
            self._require(self.path is not None, "path",
                          "give a HF model dir, a jaxzero checkpoint dir or a hub id such as "
                          "Qwen/Qwen2.5-1.5B-Instruct, or set model.demo: true")
        self._at_least(1, "demo_layers", "demo_hidden", "demo_heads", "demo_kv_heads",
                       "demo_intermediate")
        self._require(self.demo_hidden % self.demo_heads == 0, "demo_hidden",
                      f"must be a multiple of model.demo_heads ({self.demo_heads})")
        self._require(self.demo_heads % self.demo_kv_heads == 0, "demo_heads",
                      f"must be a multiple of model.demo_kv_heads ({self.demo_kv_heads})")
        # Rotary embeddings rotate pairs of head dimensions.
        self._require((self.demo_hidden // self.demo_heads) % 2 == 0, "demo_hidden",
                      "demo_hidden / demo_heads (the head dim) must be even")


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    section: ClassVar[str] = "mesh"
    data: int = 1
    fsdp: int = -1    # -1: the devices the other axes leave
    tensor: int = 1

    def _validate(self) -> None:
        sizes = self._sizes()
        for key, size in sizes.items():
            self._require(size == -1 or size >= 1, key,
                          "each mesh axis is a positive size, or -1 for the remaining devices")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh {_asked(sizes)}: at most one axis may be -1")

    def _sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    section: ClassVar[str] = "data"
    train_file: str | None = None  # prepared JSONL; None only for the demo (it prepares its own)
    test_file: str | None = None
    prompts_per_step: int = 8      # the global batch (all processes); each reads its share
    max_prompt_length: int = 1024
    shuffle: bool = True
    seed: int = 0
    prompt_buckets: tuple[int, ...] = (256, 512, 768, 1024)  # left-pad lengths: one compile each
    eval_max_prompts: int | None = None

    def _validate(self) -> None:
        self._at_least(1, "prompts_per_step", "max_prompt_length", "eval_max_prompts")
        self._at_least(0, "seed")
        b = self.prompt_buckets
        self._require(len(b) > 0 and b[0] >= 1 and all(x < y for x, y in zip(b, b[1:])),
                      "prompt_buckets",
                      "give positive lengths in increasing order, e.g. [256, 512]")
        # The sampler refuses a prompt longer than its largest bucket.
        self._require(b[-1] >= self.max_prompt_length, "prompt_buckets",
                      f"the largest bucket must hold data.max_prompt_length "
                      f"({self.max_prompt_length})")


@dataclasses.dataclass(frozen=True)
class RolloutConfig(_Section):
    section: ClassVar[str] = "rollout"
    n: int = 16                    # responses per prompt (the GRPO group)
    temperature: float = 1.0       # > 0: GRPO needs sampled rollouts
    top_p: float = 1.0
    top_k: int = 0                 # 0: off
    max_new_tokens: int = 1024
    use_sampler_logprobs: bool = False  # old log-probs from the sampler, not a recompute
    # Sequences (prompts × n) per sampler call, a multiple of n: the sampler takes
    # micro_batch / n whole prompts at a time. None: the whole batch in one call.
    micro_batch: int | None = None
    cache_dtype: Dtype | None = None    # the sampler's KV cache dtype; None: the compute dtype
    # The rollouts decode a copy of the policy in the compute dtype, made each step, laid out
    # replicated (every device whole) or tensor-parallel within a host; auto: replicated when
    # the copy takes at most a quarter of a device's memory.
    decode_layout: Literal["auto", "replicated", "tensor"] = "auto"
    decode_chunk: int = 16      # decode steps between all-stopped checks
    cache_block: int | None = 128  # KV-cache block width; decode reads only filled blocks

    def _validate(self) -> None:
        self._at_least(1, "decode_chunk", "cache_block")
        self._require(self.n >= 2, "n", "must be at least 2 (GRPO compares responses in a group)")
        # Greedy rollouts give every response of a group the same reward, so every advantage
        # is 0 and nothing is learned; the log-prob passes also divide by the temperature.
        self._require(self.temperature > 0, "temperature",
                      "GRPO trains on sampled rollouts: greedy decoding (0) gives every "
                      "response of a group the same reward, so every advantage is 0 and "
                      "nothing is learned; use a positive temperature (DiagnosisZero: 1.0)")
        self._require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]; 1 is off")
        self._at_least(0, "top_k")
        self._at_least(1, "max_new_tokens", "micro_batch")
        self._require(self.micro_batch is None or self.micro_batch % self.n == 0, "micro_batch",
                      f"counts sequences and must be a multiple of rollout.n ({self.n}): the "
                      "sampler takes whole prompts with their n rollouts")


@dataclasses.dataclass(frozen=True)
class RewardConfig(_Section):
    section: ClassVar[str] = "reward"
    mode: Literal["strict", "flexible"] = "strict"
    matcher: Literal["rapidfuzz", "difflib"] = "rapidfuzz"
    format_score: float = 0.1  # a well-formed answer with the wrong diagnosis
    score: float = 1.0         # the right diagnosis
    threshold: float = 0.8     # fuzzy-match similarity that counts as the right diagnosis

    def _validate(self) -> None:
        self._positive("score")
        self._require(self.format_score <= self.score, "format_score",
                      f"must not exceed reward.score ({self.score}): a wrong diagnosis "
                      "would out-score a right one")
        self._require(0 <= self.threshold <= 1, "threshold", "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(_Section):
    section: ClassVar[str] = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float | None = None  # dual-clip bound for negative advantages; None: off
    # token-mean: one token mean over the whole batch (modern verl). seed-micro-token-mean:
    # DiagnosisZero's verl, the mean over its micro-batches of each one's token mean; the
    # batch is first ordered as the seed's trainer orders it over seed_dp_ranks ranks
    # (Karmarkar-Karp by token count), then cut into seed_micro_batch_rows-row groups.
    loss_agg: LossAgg = "token-mean"
    seed_micro_batch_rows: int | None = None  # the seed's ppo_micro_batch_size per GPU
    seed_dp_ranks: int | None = None          # the seed's data-parallel ranks (GPUs)
    # Multiplies the loss, so the gradient, before the clip. The seed's is 1/32: each GPU
    # divides its micro-batch losses by the gradient accumulation (ppo_mini_batch_size ×
    # rollout.n / GPUs over ppo_micro_batch_size per GPU = 64) and FSDP averages the GPUs,
    # so its 8 (7B: 16) micro-batch token means enter as 8/(4·64) (16/(8·64)) of their mean.
    loss_scale: float = 1.0
    scale_by_std: bool = True
    adv_eps: float = 1e-6
    use_kl_loss: bool = True
    kl_coef: float = 0.001
    kl_kind: KlKind = "low_var_kl"
    entropy_coeff: float = 0.001
    mask_truncated: bool = False   # drop responses cut off at max_new_tokens from the loss
    filter_zero_std_groups: bool = False
    max_refill_batches: int = 3
    # Optimisation passes over each batch. With one, the rollout policy is the policy being
    # updated, so no pass recomputes its log-probs: the update takes its own, detached.
    updates_per_step: int = 1
    micro_batches: int = 1         # gradient accumulation; from `jaxzero plan`
    # The log-prob passes and the update run on each rollout's real tokens, one rollout per
    # row, rows as wide as the batch's longest rollout rounded up to a multiple of this
    # (each width compiles once); packed rows are narrowed to a multiple of it too.
    row_width_multiple: int = 128
    # Sequence packing (verl's use_dynamic_bsz): whole rollouts packed into rows of this many
    # tokens, one row per data-parallel shard per micro-batch, as many micro-batches as the
    # batch needs (this replaces grpo.micro_batches, which must be 1), then narrowed to the
    # narrowest multiple of grpo.row_width_multiple that packs as few. null: no packing.
    micro_batch_tokens: int | None = None
    # Response positions whose [rows, positions, vocab] logits are formed at once in the
    # log-prob passes. Large on accelerators (fewer re-reads of the lm_head); a tiny model with
    # a 152k vocab on a CPU runs 2-3x faster with a few positions (see configs/demo.yaml).
    logit_chunk: int = 128
    max_consecutive_skips: int = 5

    def _validate(self) -> None:
        self._require(0 <= self.clip_low < 1, "clip_low", "must be in [0, 1)")
        self._require(self.clip_high >= 0, "clip_high", "must be at least 0")
        self._require(self.clip_c is None or self.clip_c > 1, "clip_c",
                      "use null for off, or a bound > 1 (verl's dual-clip constant, e.g. 3.0)")
        self._positive("adv_eps", "loss_scale")
        seed = self.loss_agg == "seed-micro-token-mean"
        for key in ("seed_micro_batch_rows", "seed_dp_ranks"):
            self._require((getattr(self, key) is not None) == seed, key,
                          "give it (a positive count) with grpo.loss_agg: "
                          "seed-micro-token-mean, and only then (null otherwise)")
        self._at_least(1, "seed_micro_batch_rows", "seed_dp_ranks")
        self._at_least(0, "kl_coef", "max_refill_batches")
        self._at_least(1, "updates_per_step", "micro_batches", "logit_chunk",
                       "max_consecutive_skips", "row_width_multiple", "micro_batch_tokens")
        self._require(self.micro_batch_tokens is None or self.micro_batches == 1,
                      "micro_batches", "must be 1 with grpo.micro_batch_tokens (packing sizes "
                      "the micro-batches by tokens); set one or the other")


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    section: ClassVar[str] = "optim"
    lr: float = 3e-7
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global-norm clip; None: off

    def _validate(self) -> None:
        self._positive("lr", "eps", "grad_clip")
        self._at_least(0, "warmup_steps", "weight_decay")
        for key in ("b1", "b2"):
            self._require(0 <= getattr(self, key) < 1, key, "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainerConfig(_Section):
    section: ClassVar[str] = "trainer"
    run_dir: str = "runs/default"
    total_epochs: int = 5
    max_steps: int | None = None
    eval_every: int = 10     # 0: no evaluation
    save_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0
    eval_examples_logged: int = 4
    export_hf: str | None = None  # HF directory written at the end; None: no export
    # Where checkpoints go: a path or a gs://, s3://, az:// URL; None: run_dir/checkpoints.
    checkpoint_dir: str | None = None
    # For a remote run_dir (gs://, s3://, az://): the local directory that mirrors it (the
    # lock, tokenizer, data and TensorBoard logs are written here and copied up); None:
    # ~/.cache/jaxzero/runs/<the URL without its scheme>.
    local_dir: str | None = None
    # DiagnosisZero's loop (ray_trainer.fit) counts steps from 1 and stops when the count
    # reaches batches × epochs, so it makes one update fewer, then validates once more.
    seed_step_count: bool = False
    # Checkpoint writes overlap the next steps (at most one in flight); false: each save
    # blocks training until it is committed.
    async_checkpoint: bool = True
    # Seconds between SIGTERM and the scheduler's SIGKILL. A final save that the last save's
    # duration says cannot commit in the time left is not started: the last committed
    # checkpoint stays the good one. None: always save.
    preemption_grace_s: float | None = None
    # Multi-process runs: a process that misses heartbeats this long is lost, and the others
    # exit non-zero naming it (JAX's heartbeat and shutdown timeouts).
    peer_timeout_s: int = 100

    def _validate(self) -> None:
        self._require(self.run_dir != "", "run_dir", "give a directory")
        remote = self.run_dir.startswith(REMOTE_SCHEMES)
        self._require(self.local_dir is None or remote, "local_dir",
                      "is only for a remote trainer.run_dir (gs://, s3://, az://)")
        self._require(self.local_dir is None or not self.local_dir.startswith(REMOTE_SCHEMES),
                      "local_dir", "must be a local path (it mirrors the remote run_dir)")
        self._at_least(1, "total_epochs", "max_steps", "save_every", "keep_checkpoints",
                       "log_every", "peer_timeout_s")
        self._at_least(0, "eval_every", "seed", "eval_examples_logged")
        self._positive("preemption_grace_s")


@dataclasses.dataclass(frozen=True)
class DemoConfig(_Section):
    section: ClassVar[str] = "demo"
    warmup_steps: int = 0     # supervised warm-up of the demo model; 0 when real
    warmup_lr: float = 1e-2
    warmup_batch: int = 16    # sequences per warm-up step
    # Diseases the warm-up answers rightly (what a pretrained model would already know); GRPO
    # trains and evaluates on the others, whose warm-up answers are drawn at random.
    familiar_diseases: tuple[str, ...] = ()

    def _validate(self) -> None:
        self._at_least(0, "warmup_steps")
        self._positive("warmup_lr")
        self._at_least(1, "warmup_batch")
        self._require(len(set(self.familiar_diseases)) == len(self.familiar_diseases),
                      "familiar_diseases", "must name each disease once")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run: one section per concern, and the rules that span sections."""

    model: ModelConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        hints = _hints(RunConfig)
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), hints[f.name]):
                raise ConfigError(f"{f.name}: expected a {hints[f.name].__name__}, "
                                  f"got {type(getattr(self, f.name)).__name__}")
        batch = self.data.prompts_per_step * self.rollout.n
        # Equal micro-batches keep one compiled train step.
        if batch % self.grpo.micro_batches:
            raise ConfigError(
                f"grpo.micro_batches={self.grpo.micro_batches} must divide data.prompts_per_step"
                f" × rollout.n = {self.data.prompts_per_step} × {self.rollout.n} = {batch}")
        g = self.grpo
        if g.loss_agg == "seed-micro-token-mean":
            # Each seed rank holds batch / ranks rows and cuts them into whole micro-batches.
            per_rank = g.seed_dp_ranks * g.seed_micro_batch_rows
            if batch % per_rank:
                raise ConfigError(
                    f"grpo.seed_dp_ranks × grpo.seed_micro_batch_rows = {g.seed_dp_ranks} × "
                    f"{g.seed_micro_batch_rows} = {per_rank} must divide data.prompts_per_step"
                    f" × rollout.n = {batch}")
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        if g.micro_batch_tokens is not None and g.micro_batch_tokens < longest:
            raise ConfigError(
                f"grpo.micro_batch_tokens={g.micro_batch_tokens}: a packed row must hold the "
                f"longest rollout, data.max_prompt_length + rollout.max_new_tokens = {longest}")
        # Equal sampler chunks keep one compiled decode loop.
        if self.rollout.micro_batch is not None and batch % self.rollout.micro_batch:
            raise ConfigError(
                f"rollout.micro_batch={self.rollout.micro_batch} must divide "
                f"data.prompts_per_step × rollout.n = {batch}")
        if self.data.train_file is None and not self.model.demo:
            raise ConfigError("data.train_file is required (a train.jsonl from `jaxzero "
                              "prepare-data`); only model.demo: true prepares its own data")
        if self.data.train_file is None and self.data.test_file is not None:
            raise ConfigError(f"data.test_file={self.data.test_file!r}: must be null when "
                              "data.train_file is null (the demo prepares both)")
        if self.demo.warmup_steps and not self.model.demo:
            raise ConfigError(f"demo.warmup_steps={self.demo.warmup_steps}: the warm-up "
                              "is for the demo model only; set it to 0 or model.demo: true")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


SECTIONS: dict[str, type[_Section]] = _hints(RunConfig)  # section key -> its dataclass


@functools.cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


# ---- values ---------------------------------------------------------------------------------

class _Mismatch(Exception):
    pass


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Scalar field types: how messages name them, and which YAML values they accept. A bool is
# not an int here, though Python says it is; an int is a float (and becomes one).
_SCALARS = {bool: ("true or false", lambda v: isinstance(v, bool)),
            int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            float: ("a finite number", _is_number),
            str: ("a string", lambda v: isinstance(v, str))}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    try:
        return _convert(value, tp)
    except _Mismatch:
        kind = {str: " (a string)", list: " (a list)", dict: " (a mapping)"}.get(type(value), "")
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {show_value(value)}{kind}") from None


def _convert(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_convert(v, args[0]) for v in value)
    if not _SCALARS[tp][1](value):
        raise _Mismatch
    return float(value) if tp is float else value


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    return _SCALARS[tp][0]


def show_value(value: Any) -> str:
    """A value as YAML spells it: null, true, 0.5, 'text', [1, 2]."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return repr(list(value) if isinstance(value, tuple) else value)


def _asked(sizes: dict[str, int]) -> str:
    return " × ".join(f"{k}={v}" for k, v in sizes.items())


# ---- building from nested mappings ----------------------------------------------------------

def _unknown_key(section: str | None, key: Any) -> ConfigError:
    """Names the key and the closest valid ones, in its own section and across sections."""
    key = str(key)
    own = _names(SECTIONS[section]) if section else list(SECTIONS)
    near = [f"{section}.{m}" if section else m for m in difflib.get_close_matches(key, own, n=3)]
    # A right name in the wrong section (or with none) points to the section that has it.
    near += [f"{s}.{m}" for s, cls in SECTIONS.items() if s != section
             for m in difflib.get_close_matches(key, _names(cls), n=1, cutoff=0.8)]
    hint = ("did you mean " + " or ".join(repr(k) for k in near[:3]) + "?" if near else
            f"valid keys{' in ' + section if section else ''}: {', '.join(own)}")
    return ConfigError(f"unknown key {f'{section}.{key}' if section else key!r}; {hint}")


def check_keys(raw: dict) -> None:
    """Raises on the first unknown section or field of a raw {section: {field: value}}."""
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown_key(None, section)
        for key in values if isinstance(values, dict) else ():
            if key not in _names(SECTIONS[section]):
                raise _unknown_key(section, key)


def config_from_dict(d: dict) -> RunConfig:
    """The typed config of a nested mapping {section: {field: value}}; absent fields default."""
    if not isinstance(d, dict):
        raise ConfigError(f"the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {show_value(d)}")
    check_keys(d)
    sections = {}
    for name, cls in SECTIONS.items():
        raw = d.get(name, {})  # a section left out takes every default
        if not isinstance(raw, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {show_value(raw)}")
        sections[name] = cls(**raw)
    return RunConfig(**sections)


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Every field, defaults included; tuples as lists so the result is plain YAML."""
    return {f.name: {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
            for f in dataclasses.fields(cfg)}


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{"section.field": value} for every field: hyperparameter tables and diffs."""
    return {f"{section}.{key}": value
            for section, values in config_to_dict(cfg).items() for key, value in values.items()}


def diff_configs(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs, in declaration order."""
    flat_a, flat_b = flatten(a), flatten(b)
    return [k for k in flat_a if flat_a[k] != flat_b[k]]
