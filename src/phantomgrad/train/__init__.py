"""Training: trainer, config, checkpoints, logging."""
