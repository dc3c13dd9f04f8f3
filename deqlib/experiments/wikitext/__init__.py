"""Word-level language modelling with the DEQ-Transformer (Table 1 / Table 5, Table 4's
WikiText-103 column, Figure 7).

The arms are Table 1's rows at one scale (:data:`ARMS`): Post-LN at its full NFE threshold and
at a reduced one, Pre-LN without the Jacobian penalty, Post-LN and Pre-LN with it, and the
explicit weight-tied stack of ``model.n_layer`` layers (the reference for time and memory).
Every arm runs for every seed of the config; arms with one seed share the initialization of
what they share, the dropout draws and the data. Per arm and seed (:func:`run_arm`): perplexity
at the threshold and against a hard NFE cap, ``||J_f||_F`` and the spectral radius on a fixed
evaluation batch over training (the loop's monitor) and at the end, plain-iteration NFE to a
tolerance, the mean step time over every step, peak memory of a training step, and how far a
stopped solve lets later tokens in.
"""

from .config import ARMS, Arm, ArmSettings, ArmThreshold, LMEvalConfig, WikiTextExperiment, arm_settings
from .measure import (activation_memory, evaluate, fixed_batch, future_token_leak, jacobian_monitor, plain_nfe,
                      step_peak_memory, unigram_perplexity)
from .run import MONITORED, load_data, run_arm

__all__ = ["ARMS", "Arm", "ArmSettings", "ArmThreshold", "LMEvalConfig", "WikiTextExperiment", "arm_settings",
           "activation_memory", "evaluate", "fixed_batch", "future_token_leak", "jacobian_monitor", "plain_nfe",
           "step_peak_memory", "unigram_perplexity", "MONITORED", "load_data", "run_arm"]
