"""Benchmarks of the SFT and DPO train steps (``jaxrlhf bench``; results in BENCHMARKS.md).

- ``flops``: model FLOPs per step (the PaLM convention) and accelerator peaks, for MFU.
- ``measure``: timing (warm-up, median of repeats), compiled and device memory, CPU matmul peak.
- ``jax_steps``: our jitted steps, built by the trainer's own ``train.step_assembly``, plus the
  full-logits path they are compared with.
- ``hf_torch``: the same steps in Hugging Face transformers + PyTorch, as a TRL user runs them.
- ``suite``: the measurements of a run (``BenchConfig``), ``report``: their table and JSON record;
  the ``jaxrlhf bench`` command itself is ``jaxrlhf.commands.bench``.
"""
