"""Knowledge distillation: pure losses, objectives, teacher ensembles and jit-compiled steps.

* `losses`      pure functions of logits / features / labels (``where=`` masks):
                Hinton KD, forward / reverse KL, generalized JSD, DKD, FitNets,
                RKD, attention transfer, TRG, sparse top-k targets.
* `objectives`  a loss plus what a step must provide (features, learned aux
                params); `objectives.combine` sums them.
* `ensembles`   multi-teacher weights (mean / confidence / entropy / MinCE /
                max-confidence) and probability-space mixing; checkpoint
                ensembles (Forget-Me-Not) and their member selection.
* `steps`       `make_step` (student + frozen teachers + objective + optax),
                `make_mutual_step` (online / mutual distillation), mixup.

Conventions and the α trap: see `kfuse.distill.losses`.
"""

from kfuse.distill import ensembles, losses, objectives, steps
from kfuse.distill.ensembles import (combine_logits, forgetting_scores, greedy_selection,
                                     stack_checkpoints, teacher_weights)
from kfuse.distill.objectives import Objective
from kfuse.distill.steps import (DistillState, DistillStep, Outputs, Teacher, TeacherOutputs,
                                 as_forward, flax_forward, make_mutual_step, make_predict,
                                 make_step, mixup)

__all__ = [
    "ensembles", "losses", "objectives", "steps",
    "Objective", "DistillState", "DistillStep", "Outputs", "Teacher", "TeacherOutputs",
    "as_forward", "flax_forward", "make_step", "make_mutual_step", "make_predict", "mixup",
    "teacher_weights", "combine_logits", "stack_checkpoints", "forgetting_scores",
    "greedy_selection",
]
