"""The measurements of ``jaxrlhf bench``: our jitted SFT/DPO steps, the naive path and PyTorch.

Measurements (``BenchConfig.measure``, any of):

- ``sft``, ``dpo`` (frozen reference in the step), ``dpo_precomputed``
  (``batch["ref_logps"]``): step time, tokens/s, MFU, compiled memory, and on a
  GPU/TPU the allocator's peak; then DPO's cost per token relative to SFT's.
- ``logprobs``: the SFT step with the chunked LM head against the full-logits
  path, for each of ``logprob_vocabs``.
- ``hf``: the same SFT and/or DPO steps (those measured, both if neither is) in
  transformers + PyTorch (``hf_torch``), each in a fresh process, run before JAX
  touches the device.
- ``fit``: the longest sequence whose SFT step fits ``fit_budget_gib`` (default:
  the device's allocator limit), chunked and full logits (``fit``).
- ``attention``: the SFT step on one packed row with each of ``attention_impls``
  at each of ``attention_lengths`` (``jaxrlhf.bench.attention``).
- ``scan``: the SFT and DPO (frozen reference) steps with the layers scanned
  and unrolled, taking turns on one train state so that load on the machine
  slows both alike: time and compiled temporaries of each.

Every step processes ``batch x seq_len`` tokens (DPO: ``batch / 2`` pairs), so
per-token costs compare directly. FLOPs and MFU follow ``jaxrlhf.bench.flops``;
the peak is the data-sheet bf16 peak of the accelerator, or on CPU (and unknown
accelerators) a matmul measured here in the compute dtype. ``report`` prints
and records the results.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import platform

import jax
from rich.console import Console

from jaxrlhf.bench import flops
from jaxrlhf.bench.attention import measure_attention
from jaxrlhf.bench.batches import dpo_batch, sft_batch
from jaxrlhf.bench.fit import longest_fit
from jaxrlhf.bench.hf_torch import HfJob, run_in_child
from jaxrlhf.bench.jax_steps import (
    Policy,
    abstract_sft_batch,
    build_policy,
    build_reference,
    compile_dpo,
    compile_sft,
    place,
    running_as,
    step_caller,
)
from jaxrlhf.bench.measure import (
    compiled_memory,
    device_bytes_limit,
    device_peak_bytes,
    first_line,
    matmul_peak_flops,
    time_alternating,
    time_calls,
)
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel.mesh import MeshConfig, make_mesh
from jaxrlhf.train.steps import DpoLossSpec

MEASUREMENTS = ("sft", "dpo", "dpo_precomputed", "logprobs", "hf", "fit", "scan", "attention", "dpo_packing")
_TINY_VOCAB = 32768
MIB = 2**20


@dataclasses.dataclass
class BenchConfig:
    preset: str = "tiny"
    """Model shape (random weights): tiny | qwen2.5-0.5b | qwen2.5-1.5b | llama3-8b."""
    vocab_size: int = 0
    """0 = the preset's own vocabulary (tiny has none: 32768)."""
    num_layers: int = 0
    """0 = the preset's depth."""
    batch: int = 4
    """Sequences per step; DPO steps take batch / 2 pairs, so every step sees batch x seq_len tokens."""
    seq_len: int = 256
    dtype: str = "float32"
    """Compute dtype (bfloat16 on accelerators; CPUs emulate bf16 matmuls slowly)."""
    param_dtype: str = "float32"
    reference_dtype: str = "float32"
    """Storage dtype of DPO's frozen reference (the trainer's default is bfloat16)."""
    remat: str = "none"
    """none | full | dots_with_no_batch_dims_saveable | dots_saveable | save_attention_out_mlp_in; anything but
    none turns on gradient checkpointing in PyTorch."""
    attention_impl: str = "xla"
    """auto | xla | cudnn (GPU) | splash (TPU) | pallas_gpu | blockwise: the kernel of every step but --measure
    attention's."""
    attention_impls: list[str] = dataclasses.field(default_factory=lambda: ["xla", "splash", "pallas_gpu"])
    """--measure attention: the kernels compared (on a GPU: xla, cudnn, pallas_gpu; a TPU: xla, splash)."""
    attention_lengths: list[int] = dataclasses.field(default_factory=lambda: [2048, 8192, 32768])
    attention_segment: int = 512
    """--measure attention: tokens per packed example."""
    chunk_size: int = 0
    """Sequence positions per LM-head chunk; 0 = automatic (as model.chunk_size)."""
    warmup: int = 2
    repeats: int = 5
    measure: list[str] = dataclasses.field(default_factory=lambda: ["sft", "dpo", "dpo_precomputed", "logprobs", "hf"])
    """Any of: sft, dpo, dpo_precomputed, logprobs, hf, fit, scan, attention, dpo_packing."""
    logprob_vocabs: list[int] = dataclasses.field(default_factory=lambda: [32768, 128256, 151936])
    fit_batch: int = 1
    fit_budget_gib: float = 0.0
    """Memory one step may use in the fit search; 0 = the device's allocator limit (GPU/TPU)."""
    fit_granularity: int = 1024
    fit_max_len: int = 262144
    devices: int = 0
    """Devices to use (FSDP over them); 0 = all."""
    seed: int = 0
    out: str = ""
    """Append the results as one JSON line to this file."""
    label: str = ""
    """A name for this run in its JSON line (scripts/gpu_bench.sh names its stages)."""


def model_config(cfg: BenchConfig, vocab_size: int | None = None) -> ModelConfig:
    vocab = vocab_size or cfg.vocab_size or (_TINY_VOCAB if cfg.preset == "tiny" else None)
    config = preset(
        cfg.preset,
        vocab_size=vocab,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        remat=cfg.remat,
        attention_impl=cfg.attention_impl,
    )
    return dataclasses.replace(config, num_layers=cfg.num_layers) if cfg.num_layers else config


class Bench:
    """One ``jaxrlhf bench`` invocation: the measurements it asked for, their results and environment."""

    def __init__(self, cfg: BenchConfig):
        unknown = sorted(set(cfg.measure) - set(MEASUREMENTS))
        if unknown:
            raise ValueError(f"unknown measurements {unknown}; known: {', '.join(MEASUREMENTS)}")
        if cfg.batch % 2 and any(m in cfg.measure for m in ("dpo", "dpo_precomputed", "hf", "scan")):
            raise ValueError(f"batch={cfg.batch} must be even: DPO steps take batch / 2 pairs")
        self.cfg = cfg
        self.config = model_config(cfg)
        # Wide enough for the tables when the output goes to a file (rich assumes 80 columns there).
        self.console = Console(width=160) if not Console().is_terminal else Console()
        self.results: dict[str, dict] = {}
        self.env: dict = {}

    # -- environment -------------------------------------------------------------------------

    def start_jax(self):
        cfg = self.cfg
        devices = jax.devices()[: cfg.devices or None]
        self.device = devices[0]
        self.mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
        peak = flops.peak_flops(self.device.device_kind)
        source = "data sheet, bf16 dense"
        if peak is None:
            peak = matmul_peak_flops(self.device, cfg.dtype)
            source = f"measured {cfg.dtype} 2048^3 matmul (fastest of 5)"
        self.peak = peak * len(devices)
        self.env.update(
            platform=self.device.platform,
            device_kind=self.device.device_kind,
            devices=len(devices),
            peak_flops_per_device=peak,
            peak_source=source,
            jax=jax.__version__,
            python=platform.python_version(),
            cpu_count=os.cpu_count(),
            load_average_start=os.getloadavg(),
        )

    def model_flops(self, task: str, config: ModelConfig | None = None) -> int:
        config, b, t = config or self.config, self.cfg.batch, self.cfg.seq_len
        if task == "sft":
            return flops.sft_step_flops(config, b, t)
        return flops.dpo_step_flops(config, b // 2, t, reference=task == "dpo")

    def rates(self, timing_median: float, step_flops: int) -> dict:
        tokens = self.cfg.batch * self.cfg.seq_len
        return {
            "tokens_per_s": tokens / timing_median,
            "model_flops_per_step": step_flops,
            "tflops_per_s": step_flops / timing_median / 1e12,
            "mfu": flops.mfu(step_flops, timing_median, self.peak),
        }

    def chunk_size(self) -> int | None:
        return self.cfg.chunk_size or None

    # -- our steps ---------------------------------------------------------------------------

    def measure_ours(self, name: str, compile_step, policy: Policy, *args, step_flops: int) -> dict:
        """Compile with ``compile_step()``, then time the step.

        A failure (out of memory, a kernel this device lacks) is recorded as the
        measurement's result and the run goes on: one GPU run must return every
        number it can.
        """
        try:
            compiled = compile_step()
            memory = compiled_memory(compiled)
            timing = time_calls(step_caller(compiled, policy, *args), warmup=self.cfg.warmup, repeats=self.cfg.repeats)
        except Exception as e:
            return self.progress(name, {"error": f"{type(e).__name__}: {first_line(e)}"})
        row = {
            "step": timing.as_dict(),
            **self.rates(timing.median, step_flops),
            "memory": memory,
            "device_peak_bytes": device_peak_bytes(self.device),
        }
        return self.progress(name, row)

    def progress(self, name: str, row: dict) -> dict:
        """One line per finished measurement, so that a run cut short still shows what it measured."""
        if not succeeded(row):
            lines = row["error"].strip().splitlines()
            self.console.print(f"{name}: error: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else ""))
        elif "mfu" in row:
            self.console.print(
                f"{name}: {row['step']['median_s'] * 1e3:.1f} ms/step (spread {row['step']['spread']:.0%}), "
                f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}, {memory_of(row) / MIB:,.0f} MiB"
            )
        else:
            self.console.print(f"{name}: {row['step']['median_s'] * 1e3:.1f} ms/step, {memory_of(row) / MIB:,.0f} MiB")
        return row

    def run_steps(self):
        cfg, wanted = self.cfg, self.cfg.measure
        if not any(m in wanted for m in ("sft", "dpo", "dpo_precomputed")):
            return
        policy = build_policy(self.config, self.mesh, seed=cfg.seed)
        vocab = self.config.vocab_size
        if "sft" in wanted:
            batch = place(sft_batch(cfg.batch, cfg.seq_len, vocab, seed=cfg.seed), self.mesh)
            self.results["sft"] = self.measure_ours(
                "ours sft",
                functools.partial(compile_sft, policy, batch, chunk_size=self.chunk_size()),
                policy,
                batch,
                step_flops=self.model_flops("sft"),
            )
        spec = DpoLossSpec()
        if "dpo" in wanted:
            reference = build_reference(self.config, self.mesh, dtype=cfg.reference_dtype, seed=cfg.seed)
            batch = place(dpo_batch(cfg.batch // 2, cfg.seq_len, vocab, seed=cfg.seed), self.mesh)
            self.results["dpo"] = self.measure_ours(
                "ours dpo",
                functools.partial(compile_dpo, policy, batch, spec, reference, chunk_size=self.chunk_size()),
                policy,
                batch,
                reference,
                step_flops=self.model_flops("dpo"),
            )
            del reference
        if "dpo_precomputed" in wanted:
            batch = place(dpo_batch(cfg.batch // 2, cfg.seq_len, vocab, seed=cfg.seed, ref_logps=True), self.mesh)
            self.results["dpo_precomputed"] = self.measure_ours(
                "ours dpo_precomputed",
                functools.partial(compile_dpo, policy, batch, spec, None, chunk_size=self.chunk_size()),
                policy,
                batch,
                None,
                step_flops=self.model_flops("dpo_precomputed"),
            )
        del policy
        gc.collect()

    def run_logprobs(self):
        cfg = self.cfg
        if "logprobs" not in cfg.measure:
            return
        rows = {}
        for vocab in cfg.logprob_vocabs:
            config = model_config(cfg, vocab)
            policy = build_policy(config, self.mesh, seed=cfg.seed)
            batch = place(sft_batch(cfg.batch, cfg.seq_len, vocab, seed=cfg.seed), self.mesh)
            for chunked in (False, True):
                path = "chunked" if chunked else "full"
                rows[f"{vocab}/{path}"] = self.measure_ours(
                    f"ours sft, vocab {vocab}, {path}",
                    functools.partial(compile_sft, policy, batch, chunked=chunked, chunk_size=self.chunk_size()),
                    policy,
                    batch,
                    step_flops=self.model_flops("sft", config),
                )
            del policy
            gc.collect()
        self.results["logprobs"] = rows

    def run_scan(self):
        cfg = self.cfg
        if "scan" not in cfg.measure:
            return
        scanned = build_policy(dataclasses.replace(self.config, scan_layers=True), self.mesh, seed=cfg.seed)
        unrolled = running_as(scanned, dataclasses.replace(self.config, scan_layers=False))
        vocab, chunk = self.config.vocab_size, self.chunk_size()
        reference = build_reference(self.config, self.mesh, dtype=cfg.reference_dtype, seed=cfg.seed)
        sft = place(sft_batch(cfg.batch, cfg.seq_len, vocab, seed=cfg.seed), self.mesh)
        dpo = place(dpo_batch(cfg.batch // 2, cfg.seq_len, vocab, seed=cfg.seed), self.mesh)
        rows = {}
        for task, compile_step, args in (
            ("sft", lambda p: compile_sft(p, sft, chunk_size=chunk), (sft,)),
            ("dpo", lambda p: compile_dpo(p, dpo, DpoLossSpec(), reference, chunk_size=chunk), (dpo, reference)),
        ):
            compiled = {"scanned": compile_step(scanned), "unrolled": compile_step(unrolled)}
            # Both programs take turns on the scanned policy's state: the same arrays, donated and replaced.
            calls = {name: step_caller(step, scanned, *args) for name, step in compiled.items()}
            timings = time_alternating(calls, warmup=cfg.warmup, repeats=cfg.repeats)
            rows[task] = {
                name: self.progress(
                    f"ours {task}, layers {name}",
                    {
                        "step": timings[name].as_dict(),
                        **self.rates(timings[name].median, self.model_flops(task)),
                        "memory": compiled_memory(step),
                    },
                )
                for name, step in compiled.items()
            }
        self.results["scan"] = rows

    def run_attention(self):
        if "attention" in self.cfg.measure:
            self.results["attention"] = measure_attention(self)

    def run_fit(self):
        cfg = self.cfg
        if "fit" not in cfg.measure:
            return
        budget = int(cfg.fit_budget_gib * 2**30) if cfg.fit_budget_gib > 0 else device_bytes_limit(self.device)
        if not budget:
            raise ValueError(f"{self.device.platform} reports no memory limit: pass --fit_budget_gib")
        policy = build_policy(self.config, self.mesh, seed=cfg.seed)
        fit = {"budget_bytes": budget, "batch": cfg.fit_batch}
        for chunked in (True, False):

            def bytes_at(length: int) -> int:
                shapes = abstract_sft_batch(cfg.fit_batch, length, self.mesh)
                compiled = compile_sft(policy, shapes, chunked=chunked, chunk_size=self.chunk_size())
                total = compiled_memory(compiled)["total_bytes"]
                self.console.print(f"fit probe, {'chunked' if chunked else 'full'} logits, length {length}: {total / 2**30:.2f} GiB")
                return total

            result = longest_fit(
                bytes_at,
                budget,
                start=max(cfg.seq_len // cfg.fit_granularity, 1) * cfg.fit_granularity,
                granularity=cfg.fit_granularity,
                maximum=cfg.fit_max_len,
            )
            entry = result.as_dict()
            # memory_analysis is a prediction: run one step at the length found to confirm it.
            entry["ran"] = self._try_step(policy, result.longest, chunked) if result.longest else None
            fit["chunked" if chunked else "full"] = entry
            self.console.print(f"fit, {'chunked' if chunked else 'full'} logits: {entry}")
        self.results["fit"] = fit

    def _try_step(self, policy: Policy, length: int, chunked: bool) -> str:
        cfg = self.cfg
        try:
            batch = place(sft_batch(cfg.fit_batch, length, self.config.vocab_size, seed=cfg.seed), self.mesh)
            compiled = compile_sft(policy, batch, chunked=chunked, chunk_size=self.chunk_size())
            jax.block_until_ready(step_caller(compiled, policy, batch)())
            return "ok"
        except jax.errors.JaxRuntimeError as e:  # out of memory at run time despite the prediction
            return f"failed: {first_line(e)}"

    # -- PyTorch -----------------------------------------------------------------------------

    def run_hf(self):
        cfg = self.cfg
        if "hf" not in cfg.measure:
            return
        rows = {}
        # The PyTorch twin of each of our steps measured in this run (both when neither is).
        for task in [t for t in ("sft", "dpo") if t in cfg.measure] or ["sft", "dpo"]:
            job = HfJob(
                model_config=self.config,
                task=task,
                batch=cfg.batch,
                seq_len=cfg.seq_len,
                param_dtype=cfg.param_dtype,
                compute_dtype=cfg.dtype,
                reference_dtype=cfg.reference_dtype,
                gradient_checkpointing=cfg.remat != "none",
                warmup=cfg.warmup,
                repeats=cfg.repeats,
                seed=cfg.seed,
            )
            try:
                rows[task] = self.progress(f"pytorch {task}", run_in_child(job))
            except RuntimeError as e:  # e.g. PyTorch out of memory at a shape ours fits
                rows[task] = self.progress(f"pytorch {task}", {"error": str(e)[-2000:]})
        self.results["hf"] = rows

    def finish_hf(self):
        """MFU of the PyTorch steps, once the peak is known (they run before JAX starts)."""
        for task, row in self.results.get("hf", {}).items():
            if "error" not in row:
                row.update(self.rates(row["step"]["median_s"], self.model_flops(task)))


def succeeded(row: dict | None) -> bool:
    return bool(row) and "error" not in row


def memory_of(row: dict) -> int:
    """Bytes a measured step needs: the device's peak where it has one, else the compiled total (ours) or RSS (PyTorch)."""
    if row.get("device_peak_bytes"):
        return row["device_peak_bytes"]
    if "memory" in row:
        return row["memory"]["total_bytes"]
    return row["peak_bytes"]
