"""The typed run configs of `jaxrlhf sft`, `jaxrlhf dpo` and `jaxrlhf kto` (YAML + dotted overrides via draccus).

``TrainConfig`` holds what the algorithms share (model, data, optimizer, mesh,
checkpoints, logging, the run's length); ``SftConfig``, ``DpoConfig`` and
``KtoConfig`` add their own defaults and settings. ``model_config_of`` turns the ``model`` section
into the architecture the decoder is built from.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import yaml

from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.data import DataConfig, load_tokenizer
from jaxrlhf.data.validate import max_pairs_per_row
from jaxrlhf.models import ModelConfig, config_from_hf
from jaxrlhf.models.lora import LoraSpec, resolve_targets
from jaxrlhf.models.lora_io import read_peft_config
from jaxrlhf.ops.quantize import QTYPES, quantized_shapes
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel.mesh import MeshConfig
from jaxrlhf.train import kto_steps, steps
from jaxrlhf.train.checkpoint import CheckpointConfig
from jaxrlhf.train.optim import OptimConfig
from jaxrlhf.train.sinks import LoggingConfig


@dataclasses.dataclass
class LoraArgs:
    """LoRA (and QLoRA) fine-tuning: the base frozen, only low-rank adapters trained (peft's names and defaults)."""

    rank: int = 16
    """Adapter rank r (peft's ``r``)."""
    alpha: float = 32.0
    """Scale numerator: updates are (alpha / rank) * x A B (peft's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on each adapter's input while training (peft's ``lora_dropout``), drawn from the train state's key."""
    target_modules: list[str] | str = "all-linear"
    """Linear layers to adapt: names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), all-linear,
    or a regex over transformers' module names (model.layers.0.self_attn.q_proj)."""
    weight_qtype: str = "none"
    """none | int8 | nf4: store the frozen base's layer kernels quantized (QLoRA), dequantized in each matmul."""
    adapter_path: str = ""
    """A peft LoRA adapter folder to start from; its adapter_config.json then sets rank, alpha, dropout and targets."""


@dataclasses.dataclass
class ModelArgs:
    path: str = ""
    """Local Hugging Face model folder (config.json + safetensors)."""
    preset: str = ""
    """Instead of a folder: a preset shape, random weights (tiny, qwen2.5-*, llama3-8b, qwen3-30b-a3b, mixtral-8x7b)."""
    dtype: str = "bfloat16"
    """Compute dtype of activations and matmuls."""
    param_dtype: str = "float32"
    """Storage dtype of the trained parameters (the master weights)."""
    remat: str = "none"
    """Per-layer rematerialisation: none | full | dots_with_no_batch_dims_saveable | dots_saveable |
    save_attention_out_mlp_in (named after what each keeps; models.decoder says more)."""
    scan_layers: bool = True
    attention_impl: str = "xla"
    """xla | cudnn (GPU flash attention)."""
    chunk_size: int = 0
    """Sequence positions per LM-head chunk; 0 = automatic (about 256 MiB of logits per chunk)."""
    router_aux_loss_coef: float | None = None
    """MoE: weight of the load-balancing loss (train.router_loss); null = config.json's router_aux_loss_coef."""
    router_z_loss_coef: float = 0.0
    """MoE models: weight of the router z-loss (ST-MoE's mean squared log-partition of the router logits)."""
    lora: LoraArgs | None = None
    """LoRA adapters (e.g. ``--model.lora.rank 16``); null = full fine-tuning. With LoRA the base is stored in
    ``dtype`` and frozen, param_dtype is the adapters', and DPO's reference model is the base with the adapters off."""


@dataclasses.dataclass
class DistributedArgs:
    coordinator_address: str | None = None
    """host:port of process 0; leave empty on TPU pods and SLURM (auto-detected) and on one host."""
    num_processes: int | None = None
    process_id: int | None = None
    force: bool = False
    """Start jax.distributed with JAX's own cluster detection even without an environment hint
    (TPU VMs started with `gcloud ... --worker=all`); scripts/launch_tpu_pod.sh sets it."""
    agree_every: int = 10
    """Processes agree on data left, SIGTERM and errors once per this many steps (each holds that many
    batches in hand), not before every step; a SIGTERM is acted on within this many steps."""


@dataclasses.dataclass
class DiagnosticsConfig:
    stall_patience: int = 20
    """Explain a DPO loss stuck within stall_tolerance of ln 2 (with ~0 margins) for this many steps; 0 = off."""
    stall_tolerance: float = 1e-3
    zero_grad_patience: int = 3
    """Explain a gradient norm of ~0 (< 1e-6) for this many steps; 0 = off."""


@dataclasses.dataclass
class TrainConfig:
    """Settings shared by SFT and DPO runs."""

    run_dir: str = "runs/run"
    """Checkpoints, metrics.jsonl, TensorBoard, the resolved config.yaml and the exported model go here."""
    seed: int = 0
    model: ModelArgs = dataclasses.field(default_factory=ModelArgs)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    distributed: DistributedArgs = dataclasses.field(default_factory=DistributedArgs)
    max_steps: int = 0
    """Optimizer steps; 0 = one pass over data.num_epochs (estimated from the record count)."""
    micro_batches: int = 1
    """Gradient accumulation: the global batch is split into this many micro-batches."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (and at the end); 0 = only at the end."""
    eval_at_start: bool = True
    """Also evaluate before the first step, as the baseline the run is measured against."""
    export: bool = True
    """Write a Hugging Face folder to <run_dir>/hf at the end."""
    stop_after_steps: int = 0
    """Stop (with a checkpoint) after this many steps of this invocation; 0 = run to the end. For tests."""
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    dry_run: bool = False
    """Compile the step on abstract arrays and print per-device memory; train nothing, read no data or weights."""
    dry_run_devices: int = 0
    """With dry_run: plan on this many fake CPU devices (a laptop planning a pod run); 0 = the real devices."""
    hardware: str = ""
    """The accelerator this config is written for (h100, h200, a100-40gb, a100-80gb, b200, tpu-v4, tpu-v5e,
    tpu-v5p, tpu-v6e, laptop-cpu): the dry run's verdict is against its memory."""
    dry_run_device: str = ""
    """With dry_run: judge the plan against this accelerator instead of `hardware`."""
    dry_run_device_memory_gib: float = 0.0
    """With dry_run: judge the plan against this much memory per device (GiB) instead."""
    dry_run_headroom: float = 0.1
    """Fraction of device memory a plan must leave free: XLA:CPU's plan is not the accelerator's."""

    def has_eval(self) -> bool:
        return bool(self.data.eval) or self.data.eval_fraction > 0


@dataclasses.dataclass
class SftConfig(TrainConfig):
    run_dir: str = "runs/sft"


@dataclasses.dataclass
class DpoArgs:
    beta: float = 0.1
    loss_type: list[str] = dataclasses.field(default_factory=lambda: ["sigmoid"])
    """One or more of jaxrlhf.ops.losses.DPO_LOSSES; several are summed with loss_weights. orpo, simpo and cpo
    (with sft) read the policy alone: when only those are selected, no reference is loaded or run."""
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term next to the NLL (TRL's ORPOConfig.beta)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma (>= 0); SimPO's paper pairs it with beta around 2."""
    cpo_alpha: float = 1.0
    """cpo: weight of the chosen reply's NLL (TRL's CPOConfig.cpo_alpha)."""
    reference: str = "model"
    """model: a frozen reference in the same step | precomputed: from `jaxrlhf precompute-ref` | none: reference-free.
    Ignored (nothing loaded) when every loss_type is reference-free."""
    reference_logps: str = ""
    """Folder of precomputed reference log-probs; empty = <run_dir>/ref_logps."""
    reference_path: str = ""
    """Reference model folder; empty = the policy's starting point (model.path)."""
    reference_dtype: str = "bfloat16"
    """Storage dtype of the frozen reference parameters."""

    def spec(self, micro_batches: int = 1) -> steps.DpoLossSpec:
        """The loss settings, checked: a mistake here is a ConfigError before any model is loaded."""
        if self.reference not in ("model", "precomputed", "none"):
            raise ConfigError(f"dpo.reference must be model, precomputed or none, got {self.reference!r}")
        try:
            spec = steps.DpoLossSpec(
                beta=self.beta,
                loss_type=tuple(self.loss_type),
                loss_weights=None if self.loss_weights is None else tuple(self.loss_weights),
                label_smoothing=self.label_smoothing,
                discopop_tau=self.discopop_tau,
                orpo_lambda=self.orpo_lambda,
                simpo_gamma=self.simpo_gamma,
                cpo_alpha=self.cpo_alpha,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if spec.sorts_across_batch and micro_batches > 1:
            raise ConfigError(
                f"dpo.loss_type {list(spec.loss_type)} sorts pairs across the batch, which micro-batches would "
                "change: use micro_batches: 1 with aot losses"
            )
        return spec


@dataclasses.dataclass
class DpoConfig(TrainConfig):
    run_dir: str = "runs/dpo"
    dpo: DpoArgs = dataclasses.field(default_factory=DpoArgs)

    @property
    def reference_args(self) -> DpoArgs:
        return self.dpo

    def reference_setting(self) -> str:
        """``dpo.reference``, or ``none`` when every selected loss is reference-free."""
        return "none" if self.dpo.spec().reference_free else self.dpo.reference

    def reference_model_path(self) -> str:
        """The reference model's folder: dpo.reference_path, else the policy's starting point."""
        return self.dpo.reference_path or self.model.path

    def reference_folder(self) -> str:
        """Where `jaxrlhf precompute-ref` writes, and `reference: precomputed` reads, the reference log-probs."""
        return self.dpo.reference_logps or str(pathlib.Path(self.run_dir) / "ref_logps")


@dataclasses.dataclass
class KtoArgs:
    beta: float = 0.1
    desirable_weight: float = 1.0
    """Weight of the desirable (label true) examples' losses (TRL's KTOConfig.desirable_weight)."""
    undesirable_weight: float = 1.0
    """Weight of the undesirable (label false) examples' losses; with unbalanced labels the run suggests both."""
    reference_path: str = ""
    """Reference model folder; empty = the policy's starting point (model.path). KTO's reference runs in the
    step (a LoRA policy's is its base, adapters off)."""
    reference_dtype: str = "bfloat16"
    """Storage dtype of the frozen reference parameters."""

    def spec(self) -> kto_steps.KtoLossSpec:
        try:
            return kto_steps.KtoLossSpec(self.beta, self.desirable_weight, self.undesirable_weight)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass
class KtoConfig(TrainConfig):
    """`jaxrlhf kto`: unpaired examples labelled desirable or not (paired preference data: chosen true, rejected
    false); data.batch_size counts examples."""

    run_dir: str = "runs/kto"
    kto: KtoArgs = dataclasses.field(default_factory=KtoArgs)

    @property
    def reference_args(self) -> KtoArgs:
        return self.kto

    def reference_setting(self) -> str:
        return "model"

    def reference_model_path(self) -> str:
        return self.kto.reference_path or self.model.path


def load_run_config(path: str | pathlib.Path) -> DpoConfig | KtoConfig:
    """A run directory's config.yaml: a KTO run's as ``KtoConfig``, an SFT or DPO run's as ``DpoConfig`` (a
    superset of ``SftConfig``)."""
    saved = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    return load_config(KtoConfig if "kto" in saved else DpoConfig, path)


# What a checkpoint means: the settings a resumed run must share with the run that saved it. Runtime
# choices (compute dtype, remat, attention kernel, micro_batches, mesh, logging, loaders' threads) may change.
_MEANINGFUL = ("seed", "max_steps", "model.path", "model.preset", "model.param_dtype", "model.scan_layers",
               "model.lora", "model.lora.", "data.", "optim.", "dpo.", "kto.")  # fmt: skip
_RUNTIME = ("data.eval", "data.eval_batch_size", "data.worker_count", "data.worker_buffer_size", "data.read_threads",
            "data.prefetch_buffer_size", "data.cache_dir", "dpo.reference_logps")  # fmt: skip


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def checkpoint_meaning(config: TrainConfig, task: str) -> dict:
    """The dotted settings (JSON values) that give a checkpoint of this run its meaning, with the task."""
    flat = _flat(json.loads(json.dumps(dataclasses.asdict(config), default=str)))
    kept = {
        key: value
        for key, value in flat.items()
        if any(key == m or (m.endswith(".") and key.startswith(m)) for m in _MEANINGFUL) and key not in _RUNTIME
    }
    if config.model.lora is not None:  # the frozen base (and so DPO's reference) is stored in model.dtype
        kept["model.dtype"] = config.model.dtype
    return {"task": task, **kept}


def changed_settings(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every setting of ``checkpoint_meaning`` that differs."""
    keys = sorted(set(saved) | set(now))
    missing = "(unset)"
    return [f"{k}: {saved.get(k, missing)!r} -> {now.get(k, missing)!r}" for k in keys if saved.get(k) != now.get(k)]


def model_config_of(
    args: ModelArgs, path: str, *, param_dtype: str, tokenizer: str = "", sequence_parallel: bool = False
) -> ModelConfig:
    """The architecture (from the folder's config.json, or the preset) with the run's dtypes and switches."""
    runtime = dict(
        dtype=args.dtype,
        param_dtype=param_dtype,
        remat=args.remat,
        scan_layers=args.scan_layers,
        attention_impl=args.attention_impl,
        sequence_parallel=sequence_parallel,
    )
    if args.preset:
        vocab = len(load_tokenizer(tokenizer)) if args.preset == "tiny" else None
        return with_lora(preset(args.preset, vocab_size=vocab, **runtime), args.lora)
    if not path:
        raise ConfigError("model.path is empty: point it at a local Hugging Face model folder (or set model.preset)")
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: model.path must be a local Hugging Face model folder")
    return with_lora(config_from_hf(json.loads(config_file.read_text()), **runtime), args.lora)


def with_lora(config: ModelConfig, args: LoraArgs | None) -> ModelConfig:
    """``config`` with the adapters ``model.lora`` describes (from its adapter folder when one is given)."""
    if args is None:
        return config
    try:
        if args.adapter_path:
            found = read_peft_config(args.adapter_path, num_layers=config.num_layers)
            spec = LoraSpec(**found)
        else:
            targets = resolve_targets(args.target_modules, config.num_layers)
            spec = LoraSpec(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets)
        if args.weight_qtype not in ("none", *QTYPES):
            raise ValueError(f"model.lora.weight_qtype must be none, {', '.join(QTYPES)}; got {args.weight_qtype!r}")
        if args.weight_qtype != "none":  # kernels are quantized along their last axis: head_dim, hidden or MLP width
            for name in ("head_dim", "hidden_size", "intermediate_size"):
                try:
                    quantized_shapes((getattr(config, name),), args.weight_qtype)
                except ValueError as e:
                    raise ValueError(f"model.lora.weight_qtype {args.weight_qtype} cannot store this model ({name}: {e})")
        return dataclasses.replace(config, lora=spec, weight_qtype=args.weight_qtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def reference_is_base(config: DpoConfig | KtoConfig) -> bool:
    """A LoRA policy's reference model is its base with the adapters off (TRL's default with peft), unless
    dpo.reference_path (kto.reference_path) names another model."""
    lora = config.model.lora is not None
    return lora and config.reference_setting() == "model" and not config.reference_args.reference_path


def loss_spec(config: TrainConfig, task: str):
    """The checked loss settings of ``task``: DPO's or KTO's spec (None for SFT)."""
    if task == "dpo":
        return config.dpo.spec(config.micro_batches)
    return config.kto.spec() if task == "kto" else None


def rows_are_packed(config: TrainConfig, task: str) -> bool:
    """Whether training rows may hold several examples (SFT) or pairs (DPO), so that attention needs the
    segment mask; padded rows (eval, and KTO always) need none."""
    return task != "kto" and config.data.packing != "none"


def pairs_per_row(config: TrainConfig, task: str) -> int | None:
    """The static number of pair slots of a packed DPO row (the step's ``pairs_per_row``); None: padded rows."""
    return max_pairs_per_row(config.data.max_length) if task == "dpo" and rows_are_packed(config, task) else None


def _valid_micro_batches(rows: int, data_parallel: int) -> list[int]:
    return [m for m in range(1, rows + 1) if rows % m == 0 and (rows // m) % data_parallel == 0]


def eval_micro_batches(config: TrainConfig) -> int:
    """Eval runs micro-batches of the training micro-batch's rows, so eval fits wherever training does."""
    rows = config.data.eval_batch_size or config.data.batch_size
    per_micro = config.data.batch_size // max(config.micro_batches, 1)
    return max(rows // max(per_micro, 1), 1)


def check_batch_layout(config: TrainConfig, mesh_shape: dict) -> None:
    """Every (micro-)batch splits evenly over the data-parallel devices, or a ConfigError names the way out.

    A micro-batch whose rows do not divide over ``data x fsdp`` is not split at all:
    XLA quietly runs it whole on every device.
    """
    config.data.check()
    if config.micro_batches < 1:
        raise ConfigError(f"micro_batches must be >= 1, got {config.micro_batches}")
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    mesh = "x".join(f"{k} {v}" for k, v in mesh_shape.items())
    batch, micro = config.data.batch_size, config.micro_batches
    if batch % (dp * micro) == 0:
        eval_rows = config.data.eval_batch_size or batch
        per_micro = batch // micro
        if eval_rows % per_micro:
            raise ConfigError(
                f"data.eval_batch_size {eval_rows} is not a multiple of the training micro-batch ({per_micro} rows: "
                f"data.batch_size {batch} / micro_batches {micro}); eval runs micro-batches of that size"
            )
        return
    step = dp * micro
    sizes = sorted({max(step, batch // step * step), (batch // step + 1) * step})
    valid = _valid_micro_batches(batch, dp)
    hint = f"micro_batches {', '.join(map(str, valid))}" if valid else f"no micro_batches value works for batch {batch}"
    raise ConfigError(
        f"data.batch_size {batch} with micro_batches {micro} does not split over the {dp} data-parallel devices of "
        f"mesh {mesh} (each micro-batch needs a multiple of {dp} rows): use data.batch_size "
        f"{' or '.join(map(str, sizes))}, or with batch {batch}: {hint}"
    )
