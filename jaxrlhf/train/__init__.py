"""Training: run configs, the assembly of a run, the one jitted step, the shared loop, checkpoints,
metric sinks, dry-run plans. The commands that start runs are in ``jaxrlhf.commands``."""
