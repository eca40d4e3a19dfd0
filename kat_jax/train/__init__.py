"""Train state, optimizer, losses, the shared step and loop, checkpoints, metrics, stages."""
