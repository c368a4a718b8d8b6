"""Training: train state, jitted SFT/DPO steps, the shared loop, checkpoints, metric sinks."""
