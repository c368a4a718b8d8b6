"""`jaxrlhf sft` and `jaxrlhf dpo`: typed run configs and the assembly of a run.

config -> distributed init -> mesh -> model (+ frozen reference) -> data
iterators -> optimizer and train state (restored when a checkpoint exists) ->
jitted step with in/out shardings and donation -> the shared loop -> export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.config import ConfigError, dump_config, load_config
from jaxrlhf.data import DataConfig, make_iterator
from jaxrlhf.data import load_tokenizer
from jaxrlhf.models import (
    ModelConfig,
    config_from_hf,
    default_chunk_size,
    init_model,
    load_hf,
    make_logprob_fn,
    save_hf,
)
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel.distributed import initialize_distributed
from jaxrlhf.parallel.mesh import MeshConfig, make_mesh
from jaxrlhf.train import steps
from jaxrlhf.train.dry_run import abstract_train_state, dry_run, use_fake_devices
from jaxrlhf.train.diagnostics import DpoStallWatcher, NonFiniteWatcher, ZeroGradientWatcher
from jaxrlhf.train.checkpoint import CheckpointConfig, Checkpointer, abstract_like
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.optim import OptimConfig, init_opt_state, make_optimizer
from jaxrlhf.train.reference import ReferenceTable, all_pairs_config, pair_keys, write_reference
from jaxrlhf.train.prefetch import DevicePrefetcher, batch_sharding, place_batch, rows_sharded
from jaxrlhf.train.sinks import LoggingConfig, MetricSinks, ProgressBar


@dataclasses.dataclass
class ModelArgs:
    path: str = ""
    """Local Hugging Face model folder (config.json + safetensors)."""
    preset: str = ""
    """Instead of a folder: a preset shape with random weights (tiny, qwen2.5-0.5b, qwen2.5-1.5b, llama3-8b)."""
    dtype: str = "bfloat16"
    """Compute dtype of activations and matmuls."""
    param_dtype: str = "float32"
    """Storage dtype of the trained parameters (the master weights)."""
    remat: str = "none"
    """Per-layer rematerialisation: none | full | dots_saveable."""
    scan_layers: bool = True
    attention_impl: str = "xla"
    """xla | cudnn (GPU flash attention)."""
    chunk_size: int = 0
    """Sequence positions per LM-head chunk; 0 = automatic (about 256 MiB of logits per chunk)."""


@dataclasses.dataclass
class DistributedArgs:
    coordinator_address: str | None = None
    """host:port of process 0; leave empty on TPU pods and SLURM (auto-detected) and on one host."""
    num_processes: int | None = None
    process_id: int | None = None
    force: bool = False
    """Start jax.distributed with JAX's own cluster detection even without an environment hint
    (TPU VMs started with `gcloud ... --worker=all`); scripts/launch_tpu_pod.sh sets it."""


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



@dataclasses.dataclass
class SftConfig(TrainConfig):
    run_dir: str = "runs/sft"


@dataclasses.dataclass
class DpoArgs:
    beta: float = 0.1
    loss_type: list[str] = dataclasses.field(default_factory=lambda: ["sigmoid"])
    """One or more of jaxrlhf.ops.losses.DPO_LOSSES; several are summed with loss_weights."""
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    reference: str = "model"
    """model: a frozen reference in the same step | precomputed: from `jaxrlhf precompute-ref` | none: reference-free."""
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

    def reference_model_path(self) -> str:
        """The reference model's folder: dpo.reference_path, else the policy's starting point."""
        return self.dpo.reference_path or self.model.path


def model_config_of(args: ModelArgs, path: str, *, param_dtype: str, tokenizer: str = "") -> ModelConfig:
    """The architecture (from the folder's config.json, or the preset) with the run's dtypes and switches."""
    runtime = dict(
        dtype=args.dtype,
        param_dtype=param_dtype,
        remat=args.remat,
        scan_layers=args.scan_layers,
        attention_impl=args.attention_impl,
    )
    if args.preset:
        vocab = len(load_tokenizer(tokenizer)) if args.preset == "tiny" else None
        return preset(args.preset, vocab_size=vocab, **runtime)
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: model.path must be a local Hugging Face model folder")
    return config_from_hf(json.loads(config_file.read_text()), **runtime)


def _load_model(args: ModelArgs, path: str, mesh, *, param_dtype: str, tokenizer: str = ""):
    if args.preset:
        config = model_config_of(args, path, param_dtype=param_dtype, tokenizer=tokenizer)
        return init_model(config, mesh=mesh), config
    if not path:
        raise ConfigError("model.path is empty: point it at a local Hugging Face model folder (or set model.preset)")
    return load_hf(
        path,
        dtype=jnp.dtype(args.dtype),
        param_dtype=jnp.dtype(param_dtype),
        mesh=mesh,
        remat=args.remat,
        scan_layers=args.scan_layers,
        attention_impl=args.attention_impl,
    )


def estimated_steps(config: TrainConfig, task: str) -> int:
    """``max_steps``, or the optimizer steps of ``data.num_epochs`` passes, counted exactly.

    Drops and packing decide how many rows a pass yields, so the count is one pass
    over the encoded data (as TRL's up-front tokenization does); processes agree on
    the smallest count, since all must stop together. Set max_steps to skip it.
    """
    if config.max_steps > 0:
        return config.max_steps
    if config.data.num_epochs is None:
        raise ConfigError("data.num_epochs is null (repeat forever): set max_steps")
    if jax.process_index() == 0:
        print("counting the steps of one pass over the data (set max_steps to skip this)", file=sys.stderr)
    one_pass = dataclasses.replace(config.data, num_epochs=1)
    batches = sum(1 for _ in make_iterator(one_pass, task=task, split="train"))
    if jax.process_count() > 1:
        batches = int(np.min(multihost_utils.process_allgather(np.asarray(batches))))
    if batches == 0:
        raise ConfigError("the training data yields no full batch: fewer examples than data.batch_size after drops")
    return batches * config.data.num_epochs


def rows_are_packed(config: TrainConfig, task: str) -> bool:
    """Whether rows may hold several examples; padded rows (DPO always) need no segment mask in attention."""
    return task == "sft" and config.data.packing != "none"


def lm_head_chunk_size(config: TrainConfig, task: str, mesh, vocab_size: int) -> int:
    """``model.chunk_size``, or about 256 MiB of logits per chunk *per device*.

    Inside jit the arrays have their global shapes, so the automatic default would
    see the whole global batch and make chunks (and scan steps) far too small.
    """
    if config.model.chunk_size > 0:
        return config.model.chunk_size
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = max(config.data.batch_size // max(config.micro_batches, 1) // data_parallel, 1) * (2 if task == "dpo" else 1)
    tensor = mesh.shape["tensor"]
    vocab = vocab_size // tensor if vocab_size % tensor == 0 else vocab_size
    return default_chunk_size(rows, vocab)


def _reporter(found: list[str]):
    """Print a diagnosis where the user sees it and keep it for summary.json."""

    def report(message: str) -> None:
        found.append(message)
        print(f"\njaxrlhf diagnosis: {message}\n", file=sys.stderr, flush=True)

    return report


def build_state(config: TrainConfig, mesh, task: str):
    """Policy, optimizer and a fresh train state on ``mesh``: ``(graphdef, model_config, state, tx, schedule, total_steps)``."""
    model, model_config = _load_model(
        config.model, config.model.path, mesh, param_dtype=config.model.param_dtype, tokenizer=config.data.tokenizer
    )
    graphdef, params = nnx.split(model)
    total_steps = estimated_steps(config, task)
    tx, schedule = make_optimizer(config.optim, total_steps)
    opt_state = init_opt_state(tx, params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = steps.TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        rng=jax.device_put(jax.random.PRNGKey(config.seed), replicated),
    )
    return graphdef, model_config, state, tx, schedule, total_steps


class _Run:
    """What both algorithms build the same way: mesh, policy, optimizer state, data, sinks."""

    def __init__(self, config: TrainConfig, task: str):
        d = config.distributed
        initialize_distributed(d.coordinator_address, d.num_processes, d.process_id, force=d.force)
        self.config = config
        self.task = task
        self.run_dir = pathlib.Path(config.run_dir)
        self.mesh = make_mesh(config.mesh)
        self.graphdef, self.model_config, self.state, self.tx, self.schedule, self.total_steps = build_state(
            config, self.mesh, task
        )
        if jax.process_index() == 0:
            dump_config(config, self.run_dir / "config.yaml")
        self.logprob_fn = make_logprob_fn(
            self.graphdef,
            chunk_size=lm_head_chunk_size(config, task, self.mesh, self.model_config.vocab_size),
            packed=rows_are_packed(config, task),
        )
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.sharding_for = rows_sharded(self.mesh)
        self.train_data = make_iterator(config.data, task=task, split="train")
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", config.checkpoint)
        self.diagnoses: list[str] = []
        self.host_transform = None
        self.start_step = 0
        latest = self.checkpointer.latest_step
        if latest is not None and not config.checkpoint.resume:
            raise ConfigError(
                f"{self.run_dir} already has checkpoints (newest: step {latest}) and checkpoint.resume is false: "
                "use a new run_dir, or resume"
            )
        if latest is not None:
            self.state, data_state = self.checkpointer.restore(latest, abstract_like(self.state))
            if data_state is not None:
                self.train_data.set_state(data_state)
            self.start_step = int(self.state.step)


    def has_eval(self) -> bool:
        return bool(self.config.data.eval) or self.config.data.eval_fraction > 0

    def eval_batches(self):
        """Every eval batch as global device arrays (DPO batches keep their ``pair_mask``)."""
        for batch in make_iterator(self.config.data, task=self.task, split="eval"):
            if self.host_transform is not None:
                batch = self.host_transform(batch, pair_mask=batch.get("pair_mask"))
            yield place_batch(batch, self.sharding_for)

    def watchers(self, extra=()) -> tuple:
        watchers = [NonFiniteWatcher(lambda: self.checkpointer.latest_step)]
        patience = self.config.diagnostics.zero_grad_patience
        if patience > 0:
            watchers.append(ZeroGradientWatcher(patience=patience, report=_reporter(self.diagnoses)))
        return (*watchers, *extra)

    def train(self, step_fn, eval_fn, *, watchers=()) -> dict:
        config = self.config
        sinks = MetricSinks(self.run_dir, config.logging, run_config=dataclasses.asdict(config))
        progress = ProgressBar(self.total_steps, enabled=config.logging.progress_bar, description=self.task)
        progress.update(self.start_step, {})
        batches = DevicePrefetcher(
            self.train_data, self.sharding_for, get_state=self.train_data.get_state, transform=self.host_transform
        )
        end = self.total_steps
        if config.stop_after_steps > 0:
            end = min(end, self.start_step + config.stop_after_steps)
        try:
            with jax.set_mesh(self.mesh):
                self.state, reason = run_loop(
                    state=self.state,
                    step_fn=step_fn,
                    batches=batches,
                    start_step=self.start_step,
                    total_steps=end,
                    checkpointer=self.checkpointer,
                    sinks=sinks,
                    progress=progress,
                    log_every=config.logging.log_every,
                    eval_fn=eval_fn if self.has_eval() else None,
                    eval_every=config.eval_every,
                    eval_at_start=config.eval_at_start,
                    watchers=self.watchers(watchers),
                )
        finally:
            batches.close()
            progress.close()
            self.checkpointer.close()
            sinks.close()
        summary = {"reason": reason, "step": int(self.state.step), "data": self.train_data.stats}
        if self.diagnoses:
            summary["diagnoses"] = self.diagnoses
        finished = reason == "data_exhausted" or (reason == "done" and end == self.total_steps)
        if finished and config.export:
            summary["export"] = str(export_model(self.graphdef, self.state.params, self.model_config, self.run_dir / "hf", config))
        if jax.process_index() == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def jit_step(self, fn):
        """jit that donates the state and pins its output shardings to the input state's, so the donated
        buffers are reused in place step after step (inputs arrive already sharded)."""
        return jax.jit(fn, out_shardings=(self.state_shardings, None), donate_argnums=(0,))


def export_model(graphdef, params, model_config, out: pathlib.Path, config: TrainConfig) -> pathlib.Path:
    """Write the policy as a Hugging Face folder (with the run's tokenizer) that transformers loads."""
    save_hf(nnx.merge(graphdef, params), model_config, out, tokenizer=config.data.tokenizer or None)
    return out


def _dry_run(config: TrainConfig, task: str) -> dict:
    if config.dry_run_devices > 0:
        use_fake_devices(config.dry_run_devices)
    if config.model.attention_impl == "cudnn" and jax.devices()[0].platform == "cpu":
        # cuDNN kernels do not compile for CPU; XLA's attention holds the [T, T] scores, so this overestimates.
        print("dry run on CPU devices: attention_impl cudnn -> xla (temporaries are an upper bound)")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="xla"))
    return dry_run(
        config,
        task,
        model_config_of=model_config_of,
        chunk_size_of=lm_head_chunk_size,
        packed=rows_are_packed(config, task),
        total_steps=config.max_steps or 1000,
    )


def run_sft(config: SftConfig) -> dict:
    if config.dry_run:
        return _dry_run(config, "sft")
    run = _Run(config, "sft")
    step = run.jit_step(
        functools.partial(
            steps.sft_step,
            logprob_fn=run.logprob_fn,
            tx=run.tx,
            schedule=run.schedule,
            num_micro_batches=config.micro_batches,
        )
    )
    eval_sums = jax.jit(functools.partial(steps.sft_eval_sums, logprob_fn=run.logprob_fn))

    def evaluate(state) -> dict[str, float]:
        nll, tokens = 0.0, 0.0
        for batch in run.eval_batches():
            sums = jax.device_get(eval_sums(state.params, batch))
            nll += float(sums["nll_sum"])
            tokens += float(sums["trained_tokens"])
        return {"loss": nll / max(tokens, 1.0), "trained_tokens": tokens}

    return run.train(step, evaluate)


def _reference_folder(config: DpoConfig) -> str:
    return config.dpo.reference_logps or str(pathlib.Path(config.run_dir) / "ref_logps")


def run_dpo(config: DpoConfig) -> dict:
    spec = config.dpo.spec(config.micro_batches)
    if config.dry_run:
        return _dry_run(config, "dpo")
    run = _Run(config, "dpo")
    ref_params = None
    if config.dpo.reference == "model":
        reference, _ = _load_model(
            config.model,
            config.reference_model_path(),
            run.mesh,
            param_dtype=config.dpo.reference_dtype,
            tokenizer=config.data.tokenizer,
        )
        _, ref_params = nnx.split(reference)
    elif config.dpo.reference == "precomputed":
        table = ReferenceTable(
            _reference_folder(config),
            model_path=config.reference_model_path(),
            tokenizer_path=config.data.tokenizer,
            data=config.data,
        )

        def add_reference(batch, pair_mask=None):
            return {**batch, "ref_logps": table.lookup(batch, pair_mask=pair_mask)}

        run.host_transform = add_reference
    step = run.jit_step(
        functools.partial(
            steps.dpo_step,
            logprob_fn=run.logprob_fn,
            tx=run.tx,
            schedule=run.schedule,
            spec=spec,
            num_micro_batches=config.micro_batches,
        )
    )
    eval_pairs = jax.jit(functools.partial(steps.dpo_eval_pairs, logprob_fn=run.logprob_fn))

    def evaluate(state) -> dict[str, float]:
        # Every process gathers all pairs (with their padding mask) so the metrics are global.
        pairs = [
            multihost_utils.process_allgather(eval_pairs(state.params, batch, ref_params=ref_params), tiled=True)
            for batch in run.eval_batches()
        ]
        return steps.dpo_eval_metrics(pairs, spec)

    stall = DpoStallWatcher(
        patience=config.diagnostics.stall_patience,
        tolerance=config.diagnostics.stall_tolerance,
        loss_types=spec.loss_type,
        beta=spec.beta,
        report=_reporter(run.diagnoses),
    )
    watchers = (stall,) if config.diagnostics.stall_patience > 0 else ()
    return run.train(lambda state, batch: step(state, batch, ref_params=ref_params), evaluate, watchers=watchers)


@dataclasses.dataclass
class ExportConfig:
    run_dir: str = ""
    """A run directory written by `jaxrlhf sft` or `jaxrlhf dpo`."""
    step: int = 0
    """Checkpoint step to export; 0 = the newest."""
    out: str = ""
    """Output folder; empty = <run_dir>/hf-step<N>."""


def restore_policy(run_dir: str | pathlib.Path, step: int = 0, *, dtype: str | None = None):
    """The policy saved in a run's checkpoint: ``(model, model_config, train_config, step)``.

    ``step`` 0 means the newest. Parameters are restored straight onto all local
    devices (FSDP over them, whatever mesh the run trained on); neither the base
    weights nor the optimizer moments are materialised first. ``dtype`` overrides
    the compute dtype.
    """
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir / 'config.yaml'} not found: --run_dir must be a directory written by jaxrlhf sft/dpo")
    # DpoConfig is a superset of SftConfig, so either run's config.yaml loads into it.
    train_config = load_config(DpoConfig, run_dir / "config.yaml")
    mesh = make_mesh(MeshConfig())
    model_args = dataclasses.replace(train_config.model, dtype=dtype or train_config.model.dtype)
    model_config = model_config_of(
        model_args, model_args.path, param_dtype=model_args.param_dtype, tokenizer=train_config.data.tokenizer
    )
    tx, _ = make_optimizer(train_config.optim, max(train_config.max_steps, 1))
    graphdef, abstract_state = abstract_train_state(model_config, tx, mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", dataclasses.replace(train_config.checkpoint, async_save=False))
    try:
        step = step or checkpointer.latest_step
        if step is None:
            raise ConfigError(f"no checkpoint in {run_dir / 'checkpoints'}")
        state, _ = checkpointer.restore(step, abstract_state, with_data=False)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, state.params), model_config, train_config, step


def run_export(config: ExportConfig) -> pathlib.Path:
    """Checkpoint of a run -> Hugging Face folder (config.json, safetensors, tokenizer, generation_config)."""
    model, model_config, train_config, step = restore_policy(config.run_dir, config.step)
    out = pathlib.Path(config.out) if config.out else pathlib.Path(config.run_dir) / f"hf-step{step}"
    save_hf(model, model_config, out, tokenizer=train_config.data.tokenizer or None)
    print(f"exported step {step} of {config.run_dir} to {out}")
    return out


def run_precompute_ref(config: DpoConfig) -> pathlib.Path:
    """`jaxrlhf precompute-ref`: the reference model's log-probs of every pair, stored for `reference: precomputed`."""
    d = config.distributed
    initialize_distributed(d.coordinator_address, d.num_processes, d.process_id, force=d.force)
    mesh = make_mesh(config.mesh)
    model_path = config.reference_model_path()
    reference, ref_config = _load_model(
        config.model, model_path, mesh, param_dtype=config.dpo.reference_dtype, tokenizer=config.data.tokenizer
    )
    graphdef, ref_params = nnx.split(reference)
    chunk_size = lm_head_chunk_size(config, "dpo", mesh, ref_config.vocab_size)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=chunk_size, packed=False)
    pair_logps = jax.jit(lambda params, batch: steps.pair_logps(logprob_fn, params, batch)[0])
    keys, logps = [], []
    with jax.set_mesh(mesh):
        for batch in make_iterator(all_pairs_config(config.data), task="dpo", split="eval"):
            real = batch.pop("pair_mask").astype(bool)
            device_batch = place_batch(batch, rows_sharded(mesh))
            # Back to this process's own rows, in the order it placed them.
            local = np.asarray(
                multihost_utils.global_array_to_host_local_array(
                    pair_logps(ref_params, device_batch), mesh, batch_sharding(mesh, 2).spec
                )
            )
            keys.append(pair_keys(batch)[real])
            logps.append(local[real])
    folder = pathlib.Path(_reference_folder(config))
    write_reference(
        folder,
        np.concatenate(keys),
        np.concatenate(logps),
        model_path=model_path,
        tokenizer_path=config.data.tokenizer,
        data=config.data,
    )
    print(f"wrote reference log-probs of {sum(len(k) for k in keys)} pairs to {folder}")
    return folder
