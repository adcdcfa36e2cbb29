"""Test-time adaptation on the step protocol (`kfuse.protocol`): ``init`` / jitted ``step`` / ``reset``.

    from kfuse import adapt
    tta = adapt.tent(model.apply, optimizer=optax.adam(1e-3), apply_kwargs={"train": False})
    state = tta.init(variables, {"x": x_example}, key)
    for t, x in enumerate(stream):
        state, metrics = tta.step(state, {"x": x}, jax.random.fold_in(key, t))
        metrics["logits"]                                # online predictions for x

Families (one module each): `norm` (source, bn_adapt), `entropy` (tent, eta,
eata, sar, fisher_information), `mean_teacher` (cotta, rotta), `vida` (ViDA adapters: `adapt.make("vida", ...)` or
`kfuse.adapt.vida.vida`; not re-exported, the name is its module's), with `memory`
(RoTTA's CSTU bank), `augment` (test-time augmentations), `core` (BatchNorm
control, the shared trainable subset, losses) and `stream` (stream runner and
online evaluation). `registry` holds the methods and their paper defaults:
``adapt.make("eata", model.apply)``.
"""

from kfuse.adapt.augment import AugmentConfig, make_augment
from kfuse.adapt.core import (Adapter, Trainable, check_inputs, entropy as softmax_entropy,
                              forward, norm_layer_paths, soft_cross_entropy, trainable_mask,
                              trainable_paths, tree_norm)
from kfuse.adapt.entropy import (SAR_EXCLUDE, eata, entropy_margin, eta, fisher_information, sar,
                                 tent)
from kfuse.adapt.mean_teacher import cotta, rotta, stochastic_restore
from kfuse.adapt.norm import bn_adapt, source
from kfuse.adapt.registry import REGISTRY, default_config, make, names
from kfuse.adapt.stream import evaluate_stream, make_runner, run

__all__ = [
    "Adapter", "AugmentConfig", "REGISTRY", "SAR_EXCLUDE", "Trainable", "bn_adapt", "check_inputs",
    "cotta", "default_config", "eata", "entropy_margin", "eta", "evaluate_stream",
    "fisher_information", "forward", "make", "make_augment", "make_runner",
    "names", "norm_layer_paths", "rotta", "run", "sar", "soft_cross_entropy", "softmax_entropy",
    "source", "stochastic_restore", "tent", "trainable_mask", "trainable_paths", "tree_norm",
]
