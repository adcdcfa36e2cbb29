"""Test-time adaptation as pure, jit-compiled ``init`` / ``step`` / ``reset`` functions.

    from kfuse import adapt
    tta = adapt.tent(model.apply, optimizer=optax.adam(1e-3), apply_kwargs={"train": False})
    state = tta.init(variables, x_example)
    step = jax.jit(tta.step)
    for x in stream:
        state, logits, metrics = step(state, x)      # online predictions for x

Families (one module each): `norm` (source, bn_adapt), `entropy` (tent, eta,
eata, sar, fisher_information), `mean_teacher` (cotta, rotta), with `memory`
(RoTTA's CSTU bank), `augment` (test-time augmentations) and `core`
(BatchNorm control, trainable masks, losses, stream runner). `registry`
holds the SPEC §C defaults: ``adapt.make("eata", model.apply)``.
"""

from kfuse.adapt.augment import AugmentConfig, make_augment
from kfuse.adapt.core import (Adapter, check_inputs, entropy as softmax_entropy, forward,
                              make_runner, norm_layer_paths, run, soft_cross_entropy,
                              trainable_mask, trainable_paths)
from kfuse.adapt.entropy import (SAR_EXCLUDE, eata, entropy_margin, eta, fisher_information, sar,
                                 tent)
from kfuse.adapt.mean_teacher import cotta, rotta, stochastic_restore
from kfuse.adapt.norm import bn_adapt, source
from kfuse.adapt.registry import METHODS, default_config, make, make_optimizer, names

__all__ = [
    "Adapter", "AugmentConfig", "METHODS", "SAR_EXCLUDE", "bn_adapt", "check_inputs", "cotta",
    "default_config", "eata", "entropy_margin", "eta", "fisher_information", "forward",
    "make", "make_augment", "make_optimizer", "make_runner", "names", "norm_layer_paths",
    "rotta", "run", "sar", "soft_cross_entropy", "softmax_entropy", "source",
    "stochastic_restore", "tent", "trainable_mask", "trainable_paths",
]
