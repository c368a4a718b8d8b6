"""Drive an assembled ``Run`` through the shared loop: sinks, prefetch, evaluation, summary, export.

``train(run)`` is what `jaxrlhf sft` and `jaxrlhf dpo` do once ``assemble`` has
built the run; it returns (and writes to ``summary.json``) why the run stopped,
at which step, the data statistics and any diagnoses.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from flax import nnx

from jaxrlhf.models import merge_lora, save_hf, save_peft_adapter
from jaxrlhf.train.assembly import Run
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.prefetch import DevicePrefetcher, rows_sharded
from jaxrlhf.train.sinks import MetricSinks, ProgressBar


def export_model(
    graphdef, params, model_config, out: pathlib.Path, *, tokenizer: str = "", frozen=None, base_model: str = ""
) -> pathlib.Path:
    """Write the policy as a Hugging Face folder (with the run's tokenizer) that transformers loads.

    A LoRA policy is written merged (``out``) and as a peft adapter folder beside it
    (``<out>_adapter``, for ``PeftModel.from_pretrained`` on ``base_model``).
    """
    if frozen is None:
        save_hf(nnx.merge(graphdef, params), model_config, out, tokenizer=tokenizer or None)
        return out
    model = nnx.merge(graphdef, params, frozen)
    save_peft_adapter(model, model_config, out.with_name(out.name + "_adapter"), base_model=base_model)
    merged, merged_config = merge_lora(model, model_config)
    save_hf(merged, merged_config, out, tokenizer=tokenizer or None)
    return out


def train(run: Run) -> dict:
    """Train ``run`` to its end (or ``stop_after_steps``, SIGTERM, exhausted data); returns the summary."""
    config = run.config
    sinks = MetricSinks(
        run.run_dir, config.logging, run_config=dataclasses.asdict(config), start_step=run.start_step
    )
    progress = ProgressBar(run.total_steps, enabled=config.logging.progress_bar, description=run.task)
    progress.update(run.start_step, {})
    batches = DevicePrefetcher(
        run.train_data, rows_sharded(run.mesh), get_state=run.train_data.get_state, transform=run.host_transform
    )
    end = run.total_steps
    if config.stop_after_steps > 0:
        end = min(end, run.start_step + config.stop_after_steps)
    try:
        with jax.set_mesh(run.mesh):
            state, reason = run_loop(
                state=run.state,
                step_fn=run.step,
                batches=batches,
                start_step=run.start_step,
                total_steps=end,
                checkpointer=run.checkpointer,
                sinks=sinks,
                progress=progress,
                log_every=config.logging.log_every,
                eval_fn=run.evaluate,
                eval_every=config.eval_every,
                eval_at_start=config.eval_at_start,
                watchers=run.watchers,
                agree_every=config.distributed.agree_every,
            )
    finally:
        batches.close()
        progress.close()
        run.checkpointer.close()
        sinks.close()
    summary = {"reason": reason, "step": int(state.step), "data": run.train_data.stats}
    if run.diagnoses:
        summary["diagnoses"] = run.diagnoses
    finished = reason == "data_exhausted" or (reason == "done" and end == run.total_steps)
    if finished and config.export:
        out = export_model(
            run.graphdef, state.params, run.model_config, run.run_dir / "hf", tokenizer=config.data.tokenizer,
            frozen=run.frozen, base_model=config.model.path,
        )  # fmt: skip
        summary["export"] = str(out)
    if jax.process_index() == 0:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
