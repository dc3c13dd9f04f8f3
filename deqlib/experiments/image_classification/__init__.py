"""Image classification with the multiscale DEQ, with and without Jacobian regularization: the
shared experiment behind CIFAR-10 (Tables 2 and 3) and ImageNet (Table 2's lower half).

A data set's experiment module (``deqlib.experiments.cifar``) holds its data section and
``load_data``; everything else is here: the arms and the evaluation settings (:mod:`.config`),
``run_arm`` (:mod:`.run`), what is measured (:mod:`.measure`) and the claims judged over seeds
(:mod:`.claims`).
"""

from .claims import CLAIMS, judge_claims, metric_values, monitor_series, ratio, spearman
from .config import (EXPLICIT_ARM, JR_ARM, MDEQ_ARM, ArmsConfig, ArmSpec, ClassificationEvalConfig, arm_specs,
                     arm_train_config, check_experiment)
from .measure import (EvalSource, ImageData, equilibrium_jacobian, evaluate_equilibrium, evaluate_explicit,
                      fixed_batch, jacobian_monitor, step_peak_memory)
from .run import MONITORED, run_arm

__all__ = ["CLAIMS", "judge_claims", "metric_values", "monitor_series", "ratio", "spearman", "EXPLICIT_ARM",
           "JR_ARM", "MDEQ_ARM", "ArmsConfig", "ArmSpec", "ClassificationEvalConfig", "arm_specs", "arm_train_config",
           "check_experiment", "EvalSource", "ImageData", "equilibrium_jacobian", "evaluate_equilibrium",
           "evaluate_explicit", "fixed_batch", "jacobian_monitor", "step_peak_memory", "MONITORED", "run_arm"]
