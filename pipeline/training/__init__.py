"""One configuration trained: TrainConfig (config.py, recipes.py), the model families (models.py),
the shared trainer (train.py) with its checkpoints, device and metrics. Nothing here knows Optuna or
MLflow: the trainer's ``on_epoch_end`` is its only door out."""
