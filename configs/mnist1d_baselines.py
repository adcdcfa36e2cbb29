"""MNIST-1D baselines: logistic regression, MLP and CNN (Greydanus, 2020, Table 1).

    python -m kfuse.main --config=configs/mnist1d_baselines.py          # 3 seeds
    python -m kfuse.main --config=configs/mnist1d_baselines.py:quick    # 1 seed, shorter

Data: MNIST-1D regenerated offline (``mnist1d.data.make_dataset`` defaults,
seed 42), the original 4,000 / 1,000 train / test split, features
standardised with train statistics. Training follows the paper's recipe
(Adam, learning rate 1e-2, batch 100, 6,000 steps, no weight decay, test
accuracy after the last step). Paper targets: 32 / 68 / 94 %. The extra
``resnet1d`` row (no paper number) is kfuse's default BatchNorm ResNet.
"""

import ml_collections

from kfuse.configs import one_of, parse_arg


def _run(model, paper, steps=6000, learning_rate=1e-2, batch_size=100, **opt):
  return dict(model=model, steps=steps, batch_size=batch_size, paper=paper, log_every=500,
              optimizer=dict(name="adam", learning_rate=learning_rate, schedule="constant", **opt))


def get_config(arg=None):
  """``arg``: None (full, 3 seeds) or 'quick' (1 seed, 2,000 steps)."""
  variant = parse_arg(arg, variant=("full", one_of("full", "quick"))).variant
  config = ml_collections.ConfigDict()
  config.task = "mnist1d_baselines"
  config.workdir = "workdirs/mnist1d_baselines"
  config.overwrite = False      # replace the results of an earlier run in workdir
  config.progress = True
  config.seeds = (0, 1, 2)
  config.eval_batch_size = 1000
  config.data = dict(name="mnist1d", val_fraction=0.0, normalize=True, cache_dir="")
  config.models = ml_collections.ConfigDict(dict(
      logistic_regression=_run(dict(name="linear"), 32),
      mlp=_run(dict(name="mlp", hidden=(100, 100), activation="relu"), 68),
      # the paper's CNN: 3 plain conv layers (25 channels, stride 2), flattened into the head
      cnn=_run(dict(name="cnn1d", widths=(25, 25, 25), kernel_size=5, residual=False,
                    batch_norm=False, pool="flatten"), 94),
      # not in the paper: kfuse's default ResNet-style cnn1d with BatchNorm
      resnet1d=_run(dict(name="cnn1d", widths=(32, 64), kernel_size=5, pool="flatten"), None),
  ), sort_keys=False)
  if variant == "quick":
    config.workdir = "workdirs/mnist1d_baselines_quick"
    config.seeds = (0,)
    for spec in config.models.values():
      spec.steps = 2000
  return config
