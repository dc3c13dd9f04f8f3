"""Weight decay against Jacobian regularization (supplement B.2 / B.3, Figures 8 and 10).

For the DEQ-Transformer on WikiText and the MDEQ on CIFAR-10, five arms share each seed (its
initialization, dropout draws and data order): no regularization, weight decay at two doses,
JR at the paper's gamma, and JR with an adaptive gamma (:class:`deqlib.penalty_schedule.AdaptiveGamma`).
Every arm is measured alike: the training forward / backward residuals at the NFE thresholds,
``||J_f||_F`` and the forward residual on a fixed batch every ``monitor_every`` steps (the loop's
monitor), and after training the task metric, the spectral radius and plain-iteration NFE to a
tolerance (:func:`run_arm`). :mod:`.summary` judges the four claims over seeds.
"""

from .config import (ARMS, MODELS, Arm, MDEQPart, MonitorConfig, TransformerPart, WeightDecayExperiment, arm_name,
                     arm_train_config, split_arm)
from .measure import MONITORED, final_measures, jacobian_monitor, mdeq_pair, transformer_pair
from .run import load_data, residual_windows, run_arm
from .summary import (CLAIMS, judge_claims, monitor_points, residual_curves, residual_jacobian_correlation, spearman,
                      values)

__all__ = ["ARMS", "MODELS", "Arm", "MDEQPart", "MonitorConfig", "TransformerPart", "WeightDecayExperiment",
           "arm_name", "arm_train_config", "split_arm", "MONITORED", "final_measures", "jacobian_monitor",
           "mdeq_pair", "transformer_pair", "load_data", "residual_windows", "run_arm", "CLAIMS", "judge_claims",
           "monitor_points", "residual_curves", "residual_jacobian_correlation", "spearman", "values"]
