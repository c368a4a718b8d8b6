"""The ``jaxrlhf`` subcommands, one small module each: the only layer that reads run configs and
touches every other package (``jaxrlhf.cli`` maps names to them).

sft, dpo, precompute_ref, export, generate, init_model, inspect_data, plot, bench, demo, mask_demo;
``policy_checkpoint`` restores a run's policy for export and generate.
"""
