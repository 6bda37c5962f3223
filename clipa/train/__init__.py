"""Training: the trainer and what it is made of (step, loss, queues, optimiser, checkpoints, metrics)."""
