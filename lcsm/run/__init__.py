"""Running models: checkpoints, devices and precision, the trainer, evaluation, ablations, reports."""
