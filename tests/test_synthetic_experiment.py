"""The synthetic experiment's measurements of a trained arm (deqlib.experiments.synthetic)."""

import math
from dataclasses import replace

import torch

from deqlib import SolverSettings
from deqlib.data.synthetic import SyntheticConfig, make_synthetic
from deqlib.experiments.synthetic import SyntheticExperiment, run_arm
from deqlib.train import TrainConfig


def test_arm_reports_the_exact_jacobian_norm_and_the_nfe_of_its_equilibrium_steps(tmp_path):
    exp = SyntheticExperiment(
        data=SyntheticConfig(n_train=128, n_valid=50),
        train=TrainConfig(epochs=1, batch_size=32, lr=1e-2, pretrain_steps=2,
                          forward=SolverSettings("anderson", 6, 1e-3), backward=SolverSettings("anderson", 6, 1e-4)),
    )
    arm = run_arm(exp, 1.0, run_dir=tmp_path, progress=False)
    model = arm["model"]
    assert next(model.parameters()).device.type == "cpu"  # where the notebook plots it from
    # ||J||_F^2 / d at z* is the mean over samples of (df/dz)^2: from the derivative itself,
    # one sample at a time, not from a one-probe estimate (a random multiple per sample).
    _, xv = make_synthetic(exp.data)
    with torch.no_grad():
        _, stats = model.predict(xv[0], SolverSettings(exp.eval.method, exp.eval.nfe_cap, exp.eval.tol * 1e-3))
    z = stats.forward.z
    d = torch.stack([torch.func.grad(lambda zi, xi: model.f(zi.view(1, 1), xi.view(1, 1)).sum())(zi, xi)
                     for zi, xi in zip(z[:, 0], xv[0][:, 0])])
    assert math.isclose(arm["jac_fro"], float(d.detach().pow(2).mean().sqrt()), rel_tol=1e-6)
    # pretraining steps solve nothing (NaN NFE); the mean is over the 2 equilibrium steps
    deq_nfe = [r["fwd_nfe"] for r in arm["records"] if not r["pretrain"]]
    assert len(deq_nfe) == 2 and arm["train_fwd_nfe"] == sum(deq_nfe) / 2
