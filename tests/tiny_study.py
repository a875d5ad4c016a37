"""A seconds-long study file on the synthetic dataset, for the tuning and tracking tests."""

TINY_STUDY = """
# tiny: a seconds-long study on synthetic data. Run: python -m pipeline tune --study {path}
trials = {trials}
[fixed]
model = "mlp"
epochs = {epochs}
val_size = 200
batch_size = 32
hidden_sizes = {hidden}
schedule = "none"
[search]
lr = {{ type = "float", low = 1e-7, high = 1e-2, log = true }}
optimizer = {{ type = "categorical", choices = ["adam", "sgd"] }}
[sampler]
name = "tpe"
seed = 0
[pruner]
name = "median"
n_startup_trials = 1
n_warmup_steps = 0
{enqueue}
"""
# A good trial first, then one that cannot learn (pruned after its first epoch), then one that diverges.
ENQUEUE = """
[[enqueue]]
lr = 3e-3
optimizer = "adam"
[[enqueue]]
lr = 1e-7
optimizer = "adam"
[[enqueue]]
lr = 1e6
optimizer = "sgd"
"""


def write_study(folder, *, trials=6, epochs=4, hidden="[32]", enqueue=ENQUEUE, lr_high=None):
    path = folder / "tiny.toml"
    text = TINY_STUDY.format(path=path, trials=trials, epochs=epochs, hidden=hidden, enqueue=enqueue)
    if lr_high:
        text = text.replace("high = 1e-2", f"high = {lr_high}")
    path.write_text(text)
    return path


def storage_in(folder):
    return f"sqlite:///{folder / 'optuna.db'}"
