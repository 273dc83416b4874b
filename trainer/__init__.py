"""The run's machinery, above core/ and data/ and below the backends: the training loop in phases,
the interface a backend implements, the run folder and its log, validation, progress, the loss
plot, the summary, and the sampler's shared logic. Nothing here imports torch or mlx."""
