"""Ablations behind two findings of tta_bench: RoTTA's continual collapse, SAR ≈ BN-adapt.

    python experiments/tta_bench/ablation.py \
        --source-checkpoint WORKDIR/checkpoints/source --json /tmp/tta_ablation.json

Runs RoTTA on the continual stream of ``configs/tta_bench.py`` (severity 5,
batch 200, the 15 corruptions in order) with the source model of a finished
``tta_bench`` run (or a freshly trained one without ``--source-checkpoint``),
in a few variants that each switch off one ingredient.

Why does RoTTA fail on the blur corruptions of the continual stream?

* ``rotta``            — the registered paper defaults (the benchmark row);
* ``rotta_nu0``        — ν = 0: the teacher's weights never move, so only its
                         RobustBN statistics (updated on the memory bank) adapt;
* ``rotta_lambda_u0``  — λ_u = 0: the CSTU score is age only (no uncertainty term);
* ``rotta_weak_aug``   — CoTTA's milder augmentation instead of RoTTA's strong one;

Why is SAR no better than BN-adapt?

* ``sar``              — the benchmark row (SGD 2.5e-4, momentum 0.9, top stage frozen);
* ``sar_no_reset``     — model recovery off (``reset_constant=0``);
* ``sar_no_reset_adam``— and Tent's optimizer (Adam 1e-3);
* ``bn_adapt``         — reference: test-batch statistics.

Per corruption it prints the error and ``memory_new`` (RoTTA: the mean number
of the 64 memory slots refilled by each batch; 0 = the bank is frozen) or
``reset`` (SAR: the share of batches that ended in a model reset). These are
diagnostics, not tuned defaults: the benchmark keeps the paper defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402

from kfuse import adapt, models, train  # noqa: E402
from kfuse.adapt import augment as aug_lib  # noqa: E402
from kfuse.bench import tta_bench  # noqa: E402
from kfuse.data import corruptions as corr  # noqa: E402

_CFG = os.path.join(_ROOT, "configs", "tta_bench.py")


def _config():
  spec = importlib.util.spec_from_file_location("tta_bench_config", _CFG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("full")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--source-checkpoint", default="")
  ap.add_argument("--json", default="")
  ap.add_argument("--variants", default="rotta,rotta_nu0,rotta_lambda_u0,rotta_weak_aug,"
                  "sar,sar_no_reset,sar_no_reset_adam,bn_adapt")
  args = ap.parse_args(argv)
  cfg = _config()
  d = cfg.data
  data = corr.clean_data(d.name, pool=d.pool, pool_size=d.pool_size, pool_seed=d.pool_seed,
                         seed=cfg.seed)
  domains = corr.corrupted_domains(data, corr.CORRUPTIONS, (d.severity,), seed=cfg.seed)
  mk = dict(cfg.model.to_dict())
  model = models.get_model(mk.pop("name"), num_classes=data.source.num_classes, **mk)
  if args.source_checkpoint:
    like = model.init(jax.random.key(0), data.source.x_train[:2])
    variables = train.restore_checkpoint(args.source_checkpoint, like)
  else:
    variables, _ = tta_bench.train_source(model, data.source, cfg.source.to_dict(),
                                          jax.random.split(jax.random.key(cfg.seed), 3)[0], True)
  stream = corr.make_stream(domains, cfg.batch_size, protocol="continual", seed=cfg.seed)
  adam = dict(name="adam", learning_rate=1e-3)
  sgd = dict(name="sgd", learning_rate=2.5e-4, kwargs=dict(momentum=0.9))
  top = (r"backbone/layers_1/",)
  build = {
      "rotta": lambda: adapt.make("rotta", model.apply, optimizer=adam, apply_kwargs={"train": False}),
      "rotta_nu0": lambda: adapt.make("rotta", model.apply, optimizer=adam, nu=0.0,
                                      apply_kwargs={"train": False}),
      "rotta_lambda_u0": lambda: adapt.make("rotta", model.apply, optimizer=adam, lambda_u=0.0,
                                            apply_kwargs={"train": False}),
      "rotta_weak_aug": lambda: adapt.make("rotta", model.apply, optimizer=adam,
                                           augment=aug_lib.make_augment(aug_lib.COTTA),
                                           apply_kwargs={"train": False}),
      "sar": lambda: adapt.make("sar", model.apply, optimizer=sgd, exclude=top,
                                apply_kwargs={"train": False}),
      "sar_no_reset": lambda: adapt.make("sar", model.apply, optimizer=sgd, exclude=top,
                                         reset_constant=0.0, apply_kwargs={"train": False}),
      "sar_no_reset_adam": lambda: adapt.make("sar", model.apply, optimizer=adam, exclude=top,
                                              reset_constant=0.0, apply_kwargs={"train": False}),
      "bn_adapt": lambda: adapt.make("bn_adapt", model.apply, apply_kwargs={"train": False}),
  }
  out = {"corruptions": list(corr.CORRUPTIONS), "batch_size": cfg.batch_size, "variants": {}}
  names = [n[:5] for n in corr.CORRUPTIONS]
  print(f"{'variant':16s} " + " ".join(f"{n:>5s}" for n in names) + "   mean")
  for j, name in enumerate(args.variants.split(",")):
    t = time.time()
    r = adapt.evaluate_stream(build[name](), variables, stream, jax.random.key(j))
    r["wall_s"] = time.time() - t
    out["variants"][name] = r
    print(f"{name:16s} " + " ".join(f"{e:5.1f}" for e in r["errors"]) + f"  {r['mean']:5.1f}",
          flush=True)
    for key in ("memory_new", "reset", "num_reliable"):
      per_visit = r["metrics_per_visit"].get(key)
      if per_visit is not None:
        print(f"{'  ' + key:16s} " + " ".join(f"{v:5.2g}" for v in per_visit), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
