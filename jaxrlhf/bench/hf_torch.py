"""The baseline: the same SFT and DPO steps in Hugging Face transformers + PyTorch, as a TRL user runs them.

The model is built from our ``ModelConfig`` through transformers' own config
classes (``config_to_hf`` -> ``AutoConfig.for_model``), randomly initialised,
``sdpa`` attention; AdamW (fused on CUDA, as the HF Trainer's default
``adamw_torch_fused``) with global-norm clipping at 1.0, as ours. A compute dtype
below the parameter dtype runs under ``torch.autocast`` (the Trainer's
``bf16=True``). SFT is ``model(input_ids, labels=...)``; DPO is TRL's
``concatenated_forward``: chosen and rejected in one forward, per-token
log-probs one row at a time (TRL's ``selective_log_softmax``), the frozen
reference under ``no_grad``, the sigmoid loss.

Each job runs in a fresh Python process (``run_in_child``): its memory is its
own, and on a GPU it does not share the device with JAX's preallocated pool.
Memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the
process's peak resident set over its size after the imports (weights, gradients,
optimizer state, activations and allocator slack).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import pickle
import resource
import subprocess
import sys
import tempfile

from jaxrlhf.bench.batches import dpo_batch, sft_batch
from jaxrlhf.bench.measure import time_calls
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.hf_config import config_to_hf


@dataclasses.dataclass(frozen=True)
class HfJob:
    model_config: ModelConfig
    task: str  # "sft" | "dpo"
    batch: int  # sequences per step (DPO: batch // 2 pairs)
    seq_len: int
    param_dtype: str
    compute_dtype: str
    reference_dtype: str
    gradient_checkpointing: bool
    warmup: int
    repeats: int
    beta: float = 0.1
    seed: int = 0


def run_in_child(job: HfJob) -> dict:
    """``run_job(job)`` in a fresh Python process (``python -m jaxrlhf.bench.hf_torch``)."""
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = pathlib.Path(tmp, "job.pkl"), pathlib.Path(tmp, "result.json")
        job_path.write_bytes(pickle.dumps(job))
        done = subprocess.run([sys.executable, "-m", __name__, str(job_path), str(result_path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the PyTorch {job.task} step failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(result_path.read_text())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build_model(config: ModelConfig, *, dtype: str, device):
    """A random transformers model of ``config``'s architecture with sdpa attention, parameters in ``dtype``."""
    import torch
    import transformers

    hf = config_to_hf(config, dtype=dtype)
    hf.pop("architectures")
    hf["use_cache"] = False  # training: no KV cache (TRL turns it off too)
    hf_config = transformers.AutoConfig.for_model(**hf)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation="sdpa", dtype=getattr(torch, dtype)
        )


def _sequence_logps(model, tokens, loss_mask):
    """TRL's concatenated_forward: summed log-probs of the masked tokens of each row.

    The output at position t predicts token t+1: TRL rolls the labels left, which
    is reproduced here as the baseline's own shift.
    """
    import torch

    logits = model(input_ids=tokens).logits
    labels = torch.roll(tokens, shifts=-1, dims=1)
    mask = torch.roll(loss_mask, shifts=-1, dims=1)
    mask[:, -1] = 0
    per_token = torch.stack(
        [torch.log_softmax(row.float(), dim=-1).gather(-1, row_labels[:, None])[:, 0] for row, row_labels in zip(logits, labels)]
    )
    return (per_token * mask).sum(-1)


def _load_kernels() -> None:
    """Run one tiny attention + AdamW step so that PyTorch's lazily loaded kernels and thread pools
    (~80 MiB on CPU) are in the baseline RSS rather than counted as the step's memory."""
    import torch

    layer = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(layer.parameters())
    x = torch.randn(2, 4, 16, 64)
    attended = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    torch.log_softmax(layer(attended), dim=-1).sum().backward()
    optimizer.step()


def run_job(job: HfJob) -> dict:
    import torch
    import transformers

    _load_kernels()
    baseline_rss = _rss_bytes()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(job.seed)
    model = build_model(job.model_config, dtype=job.param_dtype, device=device)
    if job.gradient_checkpointing:
        # transformers 5.23 renamed it; older 5.x (the GPU images) only have the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)
    if job.compute_dtype == job.param_dtype:
        autocast = contextlib.nullcontext
    else:
        autocast = functools.partial(torch.autocast, device.type, dtype=getattr(torch, job.compute_dtype))
    vocab = job.model_config.vocab_size

    def update(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if job.task == "sft":
        batch = sft_batch(job.batch, job.seq_len, vocab, seed=job.seed)
        tokens = torch.from_numpy(batch["tokens"]).long().to(device)
        labels = torch.where(torch.from_numpy(batch["loss_mask"]).bool().to(device), tokens, -100)

        def step():
            with autocast():
                loss = model(input_ids=tokens, labels=labels).loss
            return update(loss)

    elif job.task == "dpo":
        reference = build_model(job.model_config, dtype=job.reference_dtype, device=device).eval().requires_grad_(False)
        batch = dpo_batch(job.batch // 2, job.seq_len, vocab, seed=job.seed)
        # [pairs, 2, T] -> [chosen rows; rejected rows], TRL's concatenation order.
        tokens = torch.from_numpy(batch["tokens"]).long().transpose(0, 1).reshape(-1, job.seq_len).to(device)
        loss_mask = torch.from_numpy(batch["loss_mask"]).float().transpose(0, 1).reshape(-1, job.seq_len).to(device)
        pairs = job.batch // 2

        def step():
            with autocast():
                with torch.no_grad():
                    ref = _sequence_logps(reference, tokens, loss_mask)
                policy = _sequence_logps(model, tokens, loss_mask)
            margin = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
            return update(-torch.nn.functional.logsigmoid(job.beta * margin).mean())

    else:
        raise ValueError(f"task must be sft or dpo, got {job.task!r}")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timing = time_calls(step, warmup=job.warmup, repeats=job.repeats, sync=lambda _: torch.cuda.synchronize() if cuda else None)
    if cuda:
        peak, memory_kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        # ru_maxrss is in KiB on Linux.
        peak, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss, "peak RSS growth"
    return {
        "step": timing.as_dict(),
        "peak_bytes": int(peak),
        "memory_kind": memory_kind,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_average_end": os.getloadavg(),
        "params": sum(p.numel() for p in model.parameters()),
    }


if __name__ == "__main__":
    job_file, result_file = sys.argv[1:]
    result = run_job(pickle.loads(pathlib.Path(job_file).read_bytes()))
    pathlib.Path(result_file).write_text(json.dumps(result))
