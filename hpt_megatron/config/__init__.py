"""Typed configuration: one dataclass per component, loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/tiny_cpu.yaml", ["algo.gate.gamma=2", "optim.lr=1e-5"])

A recipe holds only what differs from the defaults below. The ``algo`` block starts from its
``preset`` (see ``hpt_megatron.algo.presets``) and the recipe's keys are merged over it, e.g.
``algo: {preset: dapo, terms: {rl: {mask: {eps_high: 0.3}}}}``. Unknown keys, wrong types and
impossible combinations fail at load time with the dotted key and the fix. Derived values (data
parallel size, world size) are properties, never stored.

Relative paths in a recipe are resolved against the recipe's directory when the file exists
there, otherwise against the working directory.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpt_megatron.algo.presets import get_preset
from hpt_megatron.algo.spec import AlgoConfig
from hpt_megatron.config.io import (
    ConfigError,
    build,
    deep_merge,
    has_dotted,
    parse_override,
    path_field,
    paths_field,
    read_yaml,
    set_dotted,
    to_plain,
)
from hpt_megatron.models.arch import ArchConfig, arch_config_from_hf, check_parallel_layout, load_hf_config

QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class ModelConfig:
    path: str = path_field()  # Hugging Face checkpoint to start from (weights, config.json, tokenizer)
    # config.json for a randomly initialised model (when no path), or the shape used to validate and
    # plan a recipe whose ``path`` is not downloaded yet
    hf_config: str = path_field()
    hub_id: str = ""  # Hugging Face hub name of ``path`` (named in the "download it" error)
    tokenizer: str = path_field()  # tokenizer directory; defaults to ``path``
    # start from a Megatron checkpoint's weights instead (any TP/PP; the format is detected): this
    # project's sharded or torch_dist format, or Megatron-LM's torch_dist / legacy mp_rank_XX files
    # (a --save directory with latest_checkpointed_iteration.txt, or one iter_XXXXXXX directory)
    megatron_checkpoint: str = path_field()
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    layer_spec: Literal["auto", "te", "local", "sdpa"] = "auto"  # auto: te if installed, else sdpa
    fp8: Literal["e4m3", "hybrid"] | None = None  # needs Transformer Engine
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "blockwise"
    fp8_param: bool = False
    first_last_layers_bf16: bool = False
    rope_theta: float | None = None  # override config.json (Qwen2.5-Math-7B runs with 40000)
    max_position_embeddings: int | None = None
    recompute_activations: bool = False

    def checkpoint_on_disk(self) -> bool:
        """Whether ``path`` holds a downloaded Hugging Face checkpoint."""
        return bool(self.path) and (Path(self.path) / "config.json").is_file()

    def download_hint(self) -> str:
        return f"huggingface-cli download {self.hub_id or '<hub id>'} --local-dir {self.path}"

    def config_json(self) -> Path | None:
        """The checkpoint's config.json when it is on disk, else ``hf_config``: a recipe validates
        and dry-runs before its weights are downloaded (training itself still needs ``path``)."""
        if self.path and (self.checkpoint_on_disk() or not self.hf_config):
            return Path(self.path) / "config.json"
        return Path(self.hf_config) if self.hf_config else None

    def arch(self) -> ArchConfig:
        """The architecture the actor builds: ``config_json()`` with ``rope_theta`` and
        ``max_position_embeddings`` overridden when set (Qwen2.5-Math-7B is trained with 40000 and
        16384, as in LUFFY); the overrides also reach the exported config.json."""
        path = self.config_json()
        assert path is not None, "validate_config checks that model.path or model.hf_config is set"
        hf, label = load_hf_config(path)
        if self.rope_theta is not None:
            hf["rope_theta"] = self.rope_theta
            if isinstance(hf.get("rope_parameters"), dict):
                hf["rope_parameters"] = {**hf["rope_parameters"], "rope_theta": self.rope_theta}
        if self.max_position_embeddings is not None:
            hf["max_position_embeddings"] = self.max_position_embeddings
        return arch_config_from_hf(hf, label=label)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False


@dataclass
class ClusterConfig:
    num_nodes: int = 1
    devices_per_node: int = 1  # GPUs per node, or CPU worker processes
    device: Literal["auto", "cuda", "cpu"] = "auto"
    ray_address: str | None = None  # None: start a local Ray instance (when Ray is used)
    use_ray: bool = False  # run a single rank as a Ray worker too (more ranks always use Ray)
    colocate: bool = True  # rollout engines share the actor's devices

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 8192
    stop: list[str] = field(default_factory=list)
    gpu_memory_utilization: float = 0.6
    tp: int = 1  # tensor parallel size of each vLLM engine
    bucket_mb: int = 512  # weight-sync bucket size
    # after every sync each engine scores a probe sequence; a mean |log-prob - actor's| above this
    # stops the run (the engine would serve stale weights). null: 1e-3 in fp32, 0.05 in bf16/fp16
    probe_tolerance: float | None = None
    max_num_seqs: int = 256  # vLLM: sequences decoded at once
    cpu_kv_cache_gib: float = 1.0  # vLLM-CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE, unless set)
    # asynchronous rollouts: the engines generate step t + k's rollouts while step t trains, so a
    # step's rollouts come from weights at most k steps old. 0: synchronous (generate, then train)
    async_staleness: int = 0
    # pi_old of stale rollout rows: "behaviour", the engine's log-probs (the policy that sampled
    # them: ratios and clipping against it); "actor", the actor's current weights as in synchronous
    # mode (the staleness then enters only rho = pi_old / pi_rollout of algo corrections)
    async_pi_old: Literal["behaviour", "actor"] = "behaviour"
    # CPU: torch threads of the engine's thread (the actor keeps the rest); 0: half the rank's
    async_engine_threads: int = 0


@dataclass
class SyntheticDataConfig:
    """The embedded arithmetic task (hpt_megatron.data.synthetic), generated into the run directory;
    it also provides the tokenizer when model.tokenizer is empty."""

    train: int = 20000
    val: int = 200
    seed: int = 0
    min_steps: int = 2
    max_steps: int = 3
    max_start: int = 10
    max_operand: int = 9
    max_value: int = 20


@dataclass
class DataConfig:
    train_files: list[str] = paths_field()
    val_files: list[str] = paths_field()
    on_bad_row: Literal["error", "skip"] = "error"
    system_prompt: Literal["drop", "keep"] = "drop"  # HPT drops the dataset's system message
    default_system_prompt: str = QWEN_MATH_SYSTEM_PROMPT
    template: Literal["tokenizer", "llama_base", "raw"] = "tokenizer"
    max_prompt_len: int = 1024
    max_response_len: int = 8192
    on_overlong_prompt: Literal["error", "skip"] = "skip"
    shuffle: bool = True
    synthetic: SyntheticDataConfig | None = None  # generate the embedded task instead of reading files


@dataclass
class RewardConfig:
    num_workers: int = 2
    timeout_s: float = 5.0  # hard per-item limit; the worker is killed and replaced past it
    memory_limit_mb: int = 4096  # per-worker address-space cap above its start-up size
    answer_fallback: bool = False  # also accept "The answer is X" when there is no \boxed{}
    choice_by_letter: bool = False  # grade single-letter ground truths as multiple choice anywhere
    max_response_chars: int = 65_536  # longer responses keep their last characters


@dataclass
class OptimConfig:
    lr: float = 5e-6
    min_lr: float = 0.0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    skip_grad_norm_above: float | None = None  # skip the step when the pre-clip grad norm exceeds this
    # Megatron's distributed optimizer (ZeRO-1): Adam moments and fp32 master weights sharded over
    # the data-parallel ranks (1/DP each); needs trainer.checkpoint_format=torch_dist
    distributed: bool = False


@dataclass
class CriticConfig:
    """The value model of PPO (``hpt_megatron.train.critic``): the actor's architecture and TP/PP
    layout with a scalar head, on the same workers, trained with the clipped value loss. It is built
    when an algorithm of the run has a ``gae`` advantage; the optimizer is ``optim`` with ``lr``."""

    enabled: bool | None = None  # null: exactly when an algorithm of the run uses GAE
    # "actor": the actor's weights at the first step that needs values (after an SFT phase, the SFT
    # model), head at zero; or a directory: a critic checkpoint (<step>/critic), a Megatron actor
    # checkpoint in the sharded safetensors format (trunk only) or a Hugging Face model
    # (...ForTokenClassification: with its head)
    init: str = path_field("actor")
    lr: float | None = None  # null: optim.lr (optim.min_lr scales with it)
    clip: float | None = 0.5  # value clip range around the rollout-time values; null: no clipping
    warmup_steps: int = 0  # the first N steps that need values train the critic only


@dataclass
class PhaseConfig:
    """One phase of a multi-phase run (e.g. SFT then GRPO); ``algo`` is resolved like the top one."""

    steps: int = 1
    algo: AlgoConfig = field(default_factory=lambda: get_preset("hpt").build())
    name: str = ""


@dataclass
class TrainerConfig:
    total_steps: int = 500
    prompts_per_step: int = 128
    mini_batch_prompts: int = 64
    ppo_epochs: int = 1
    micro_batch_tokens: int = 32768  # token budget of one micro-batch per device
    packed: bool = True  # padding-free micro-batches (rows concatenated); false: padded rows
    seed: int = 1
    output_dir: str = path_field("runs/default")
    save_every: int = 50
    keep_last: int = 2
    eval_every: int = 10
    eval_before_train: bool = False
    resume: str = "none"  # none | auto | a checkpoint directory
    # torch_dist: megatron-core dist_checkpointing in Megatron-LM's layout (checkpoints/iter_XXXXXXX,
    # latest_checkpointed_iteration.txt); safetensors: this project's sharded format (step_XXXXXXXX)
    checkpoint_format: Literal["torch_dist", "safetensors"] = "torch_dist"
    max_bad_steps: int = 3  # stop after this many NaN/inf steps in a row
    phases: list[PhaseConfig] = field(default_factory=list)

    @property
    def run_steps(self) -> int:
        """Steps of the whole run: the phases' sum when there are phases."""
        return sum(p.steps for p in self.phases) or self.total_steps

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per training step (for the LR schedule's length)."""
        return self.ppo_epochs * (self.prompts_per_step // self.mini_batch_prompts)


@dataclass
class EvalConfig:
    files: list[str] = paths_field()
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    samples: dict[str, int] = field(default_factory=lambda: {"aime": 32, "aime25": 32, "amc": 32})
    default_samples: int = 1
    pass_k: list[int] = field(default_factory=lambda: [1])


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    plots: bool = True


@dataclass
class ProfileConfig:
    steps: tuple[int, int] | None = None  # cudaProfilerStart at the first, Stop after the second
    ranks: list[int] = field(default_factory=lambda: [0])
    torch_profiler: bool = False
    nvtx: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    algo: AlgoConfig = field(default_factory=lambda: get_preset("hpt").build())
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def algos(self) -> list[AlgoConfig]:
        """Every algorithm the run trains with (one per phase, or the top-level one)."""
        return [p.algo for p in self.trainer.phases] or [self.algo]

    @property
    def critic_enabled(self) -> bool:
        """Whether the run builds a critic (``critic.enabled``, or: some algorithm uses GAE)."""
        from hpt_megatron.algo.value import needs_critic

        if self.critic.enabled is not None:
            return self.critic.enabled
        return any(needs_critic(a) for a in self.algos)

    @property
    def dp(self) -> int:
        return self.cluster.world_size // (self.parallel.tp * self.parallel.pp)

    def to_dict(self) -> dict:
        return to_plain(self)


# ---- loading --------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), validate: bool = True
):
    """Read a recipe (or only the defaults when ``path`` is None), apply ``key=value`` overrides,
    build the typed config and validate it."""
    data, base_dir = ({}, Path.cwd()) if path is None else (_read_recipe(Path(path)), Path(path).parent)
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(data, keys, value)
    source = str(path) if path is not None else "defaults"
    try:
        cfg = config_from_dict(data, base_dir)
        if validate:
            validate_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe may start from another with ``extends: other.yaml`` (relative to itself)."""
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {parent_path}")
    return deep_merge(_read_recipe(parent_path, (*seen, parent_path)), data)


def config_from_dict(data: dict, base_dir: Path | None = None) -> Config:
    data = dict(data)
    algo_data = data.get("algo") or {}
    if not isinstance(algo_data, dict):
        raise ConfigError(f"algo: expected a mapping, got {algo_data!r}")
    preset = get_preset_or_error(algo_data.get("preset", "hpt"), "algo.preset")
    for key, value in preset.overrides.items():  # the preset's defaults outside algo; the recipe wins
        if not has_dotted(data, key.split(".")):
            set_dotted(data, key.split("."), value)
    data["algo"] = resolve_algo(algo_data, "algo")
    trainer = data.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("phases"), list):
        data["trainer"] = dict(
            trainer, phases=[_resolve_phase(p, i) for i, p in enumerate(trainer["phases"])]
        )
    cfg = build(Config, data)
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg


def get_preset_or_error(name: Any, key: str):
    if not isinstance(name, str):
        raise ConfigError(f"{key}: expected a preset name, got {name!r}")
    try:
        return get_preset(name)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def resolve_algo(algo_data: dict, key: str) -> AlgoConfig:
    """The preset's composition with the recipe's ``algo`` keys merged over it. A term set to null
    is removed (``terms: {offpolicy: null}``)."""
    if isinstance(algo_data, AlgoConfig):
        return algo_data
    name = algo_data.get("preset", "hpt")
    preset = get_preset_or_error(name, f"{key}.preset")
    merged = deep_merge(to_plain(preset.build()), algo_data)
    merged["terms"] = {k: v for k, v in (merged.get("terms") or {}).items() if v is not None}
    return build(AlgoConfig, merged, key)


def _resolve_phase(phase: Any, index: int) -> Any:
    if not isinstance(phase, dict):
        return phase
    algo_data = phase.get("algo") or {}
    if not isinstance(algo_data, dict):
        raise ConfigError(f"trainer.phases[{index}].algo: expected a mapping, got {algo_data!r}")
    return dict(phase, algo=resolve_algo(algo_data, f"trainer.phases[{index}].algo"))


def _resolve_paths(obj: Any, base_dir: Path) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("path"):
            resolved = (
                [_resolve_one(v, base_dir) for v in value]
                if isinstance(value, list)
                else _resolve_one(value, base_dir)
            )
            setattr(obj, f.name, resolved)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _resolve_paths(value, base_dir)


def _resolve_one(p: str | None, base_dir: Path) -> str | None:
    if not p or Path(p).is_absolute():
        return p
    candidate = base_dir / p
    return str(candidate) if candidate.exists() else p


# ---- validation -----------------------------------------------------------------------------------


def validate_config(cfg: Config) -> None:
    """Cross-field checks; each error names the key and the fix."""
    _validate_positive(cfg)
    _validate_layout(cfg)
    _validate_model(cfg)
    _validate_algo(cfg.algo, "algo", cfg.rollout.n)
    _validate_critic(cfg)
    _validate_optim(cfg)
    for i, phase in enumerate(cfg.trainer.phases):
        if phase.steps < 1:
            raise ConfigError(f"trainer.phases[{i}].steps must be >= 1, got {phase.steps}")
        _validate_algo(phase.algo, f"trainer.phases[{i}].algo", cfg.rollout.n)
    if cfg.profile.steps is not None and not 0 <= cfg.profile.steps[0] <= cfg.profile.steps[1]:
        raise ConfigError(
            f"profile.steps must be [start, end] with 0 <= start <= end, got {list(cfg.profile.steps)}"
        )


def _validate_positive(cfg: Config) -> None:
    checks = {
        "parallel.tp": cfg.parallel.tp,
        "parallel.pp": cfg.parallel.pp,
        "cluster.num_nodes": cfg.cluster.num_nodes,
        "cluster.devices_per_node": cfg.cluster.devices_per_node,
        "rollout.n": cfg.rollout.n,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "trainer.total_steps": cfg.trainer.total_steps,
        "trainer.prompts_per_step": cfg.trainer.prompts_per_step,
        "trainer.mini_batch_prompts": cfg.trainer.mini_batch_prompts,
        "trainer.ppo_epochs": cfg.trainer.ppo_epochs,
        "trainer.micro_batch_tokens": cfg.trainer.micro_batch_tokens,
        "reward.num_workers": cfg.reward.num_workers,
        "data.max_prompt_len": cfg.data.max_prompt_len,
        "data.max_response_len": cfg.data.max_response_len,
    }
    for key, value in checks.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.rollout.temperature < 0 or not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError("rollout.temperature must be >= 0 and rollout.top_p in (0, 1]")
    if cfg.reward.timeout_s <= 0:
        raise ConfigError(f"reward.timeout_s must be > 0, got {cfg.reward.timeout_s}")
    if cfg.rollout.async_staleness < 0:
        raise ConfigError(
            f"rollout.async_staleness must be >= 0 (0: synchronous rollouts), got {cfg.rollout.async_staleness}"
        )
    if cfg.rollout.async_engine_threads < 0:
        raise ConfigError(
            f"rollout.async_engine_threads must be >= 0 (0: half the rank's threads), got {cfg.rollout.async_engine_threads}"
        )
    if cfg.rollout.async_staleness and cfg.rollout.engine == "vllm":
        raise ConfigError(
            "rollout.async_staleness > 0 needs rollout.engine=hf for now: the colocated vLLM engine "
            "sleeps while the actor trains on the same GPU, so it cannot generate meanwhile; set "
            "rollout.async_staleness=0"
        )


def _validate_layout(cfg: Config) -> None:
    tp, pp, world = cfg.parallel.tp, cfg.parallel.pp, cfg.cluster.world_size
    if world % (tp * pp):
        raise ConfigError(
            f"parallel.tp * parallel.pp = {tp * pp} does not divide the world size {world} "
            f"(cluster.num_nodes x cluster.devices_per_node); change one of them"
        )
    t = cfg.trainer
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ConfigError(
            f"trainer.mini_batch_prompts={t.mini_batch_prompts} must divide trainer.prompts_per_step={t.prompts_per_step}"
        )
    if cfg.parallel.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
    if cfg.parallel.sequence_parallel and cfg.model.layer_spec in ("local", "sdpa"):
        raise ConfigError(
            f"parallel.sequence_parallel needs Transformer Engine layers, but model.layer_spec="
            f"{cfg.model.layer_spec!r} uses Megatron's torch norms, which cannot split the sequence; "
            "set model.layer_spec=te (or auto with Transformer Engine installed)"
        )
    if cfg.trainer.packed and cfg.model.layer_spec == "local":
        raise ConfigError(
            "trainer.packed=true needs attention that follows the packed rows' boundaries, which "
            "model.layer_spec='local' lacks: set model.layer_spec to auto or sdpa (or te), "
            "or trainer.packed=false"
        )


def _validate_model(cfg: Config) -> None:
    path = cfg.model.config_json()
    if path is None:
        raise ConfigError(
            "model.path or model.hf_config must be set (a Hugging Face checkpoint or its config.json)"
        )
    key = "model.hf_config" if cfg.model.hf_config and path == Path(cfg.model.hf_config) else "model.path"
    if not path.is_file():
        raise ConfigError(f"{key}: {str(path)!r} does not exist")
    try:
        arch = cfg.model.arch()
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    try:
        check_parallel_layout(arch, cfg.parallel.tp, cfg.parallel.pp, "parallel.tp", "parallel.pp")
    except ValueError as e:
        raise ConfigError(f"{e} (model: {path})") from None


def _validate_optim(cfg: Config) -> None:
    if not cfg.optim.distributed:
        return
    if cfg.trainer.checkpoint_format != "torch_dist":
        raise ConfigError(
            "optim.distributed=true shards the optimizer state, which only the torch_dist checkpoint "
            f"format saves: set trainer.checkpoint_format=torch_dist (got {cfg.trainer.checkpoint_format!r}) "
            "or optim.distributed=false"
        )
    if cfg.dp == 1:
        warnings.warn(
            "optim.distributed=true has no effect at data-parallel size 1 (world size / (parallel.tp x "
            "parallel.pp)): there is nothing to shard the optimizer state over",
            stacklevel=2,
        )


def _validate_critic(cfg: Config) -> None:
    from hpt_megatron.algo.value import needs_critic

    c = cfg.critic
    phases = [(f"trainer.phases[{i}].algo", p.algo) for i, p in enumerate(cfg.trainer.phases)]
    users = [key for key, algo in phases or [("algo", cfg.algo)] if needs_critic(algo)]
    if c.enabled is False and users:
        raise ConfigError(
            f"critic.enabled=false, but {users[0]} uses the 'gae' advantage, which needs critic values; "
            "remove critic.enabled (or set it to true), or choose an advantage without a value model"
        )
    if c.enabled and not users:
        warnings.warn(
            "critic.enabled=true has no effect: no algorithm of the run uses the 'gae' advantage",
            stacklevel=2,
        )
    if c.lr is not None and c.lr <= 0:
        raise ConfigError(f"critic.lr must be > 0 (or null for optim.lr), got {c.lr}")
    if c.clip is not None and c.clip <= 0:
        raise ConfigError(f"critic.clip must be > 0 (or null for no value clipping), got {c.clip}")
    if c.warmup_steps < 0:
        raise ConfigError(f"critic.warmup_steps must be >= 0, got {c.warmup_steps}")
    if users and c.init != "actor" and not Path(c.init).is_dir():
        raise ConfigError(
            f"critic.init: {c.init!r} is not a directory; use 'actor' (start from the actor's weights), "
            "a critic or Megatron checkpoint directory, or a Hugging Face model directory"
        )
    if users and cfg.parallel.sequence_parallel:
        raise ConfigError(
            "the critic does not support parallel.sequence_parallel; set it to false for PPO runs"
        )


def _validate_algo(algo: AlgoConfig, key: str, n: int) -> None:
    try:
        algo.validate(n, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
