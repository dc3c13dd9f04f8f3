"""The training loop: exact resume, the penalty really trains, checkpoints load."""

import math
from dataclasses import replace

import pytest
import torch

from deqlib import SolverSettings
from deqlib.data.synthetic import SyntheticConfig, make_synthetic
from deqlib.jacobian import JacobianPenalty
from deqlib.models.synthetic import SyntheticDEQ, SyntheticModelConfig
from deqlib.experiments.core import RUN_DIR_ENV, pipeline_run_dir
from deqlib.train import TensorBatches, TrainConfig, lr_factor, train
from deqlib.train.streams import rng, step_rng

CFG = TrainConfig(epochs=2, batch_size=32, lr=1e-2, forward=SolverSettings("anderson", 6, 1e-3),
                  backward=SolverSettings("anderson", 6, 1e-4),
                  jacobian=JacobianPenalty(gamma=1.0, p=0.5), seed=3)


def _setup(cfg=CFG):
    (x, y), _ = make_synthetic(SyntheticConfig(n_train=256, n_valid=8))
    torch.manual_seed(cfg.seed)
    model = SyntheticDEQ(SyntheticModelConfig(init_std=0.1), cfg.forward, cfg.backward)
    return model, TensorBatches((x, y), cfg.batch_size, seed=cfg.seed)


def test_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    model_a, data = _setup()
    full = train(model_a, data, CFG, run_dir=tmp_path / "a", progress=False)
    assert full.steps == 16

    model_b, data = _setup()
    first = train(model_b, data, CFG, run_dir=tmp_path / "b", progress=False, stop_after=7)
    assert first.steps == 7 and (tmp_path / "b" / "checkpoint.pt").exists()
    model_c, data = _setup()  # a fresh process would start from a fresh model
    rest = train(model_c, data, CFG, run_dir=tmp_path / "b", progress=False)
    assert rest.resumed_from == 7 and rest.steps == 16
    for (name, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pa, pc), name
    keys = ("loss", "fwd_nfe", "bwd_nfe", "jac_fro")
    for ra, rc in zip(full.records, rest.records):
        for k in keys:
            assert ra[k] == rc[k] or (math.isnan(ra[k]) and math.isnan(rc[k])), (k, ra, rc)


def test_resume_restores_the_fp16_loss_scaler(tmp_path):
    """With fp16 Accelerate scales the loss by a GradScaler whose scale grows every
    ``growth_interval`` clean steps; a resumed run must continue that scale, not restart it.
    (A CPU GradScaler stands in for the CUDA one: the same code path in Accelerate.)"""
    from accelerate import Accelerator

    def accelerator():
        acc = Accelerator(cpu=True)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=2)
        return acc

    model_a, data = _setup()
    full_acc = accelerator()
    train(model_a, data, CFG, progress=False, accelerator=full_acc)
    model_b, data = _setup()
    train(model_b, data, CFG, run_dir=tmp_path, progress=False, stop_after=7, accelerator=accelerator())
    model_c, data = _setup()
    rest_acc = accelerator()
    rest = train(model_c, data, CFG, run_dir=tmp_path, progress=False, accelerator=rest_acc)
    assert rest.resumed_from == 7
    assert rest_acc.scaler.state_dict() == full_acc.scaler.state_dict()
    assert full_acc.scaler.get_scale() > 2.0**4  # the scale did grow: the check has teeth
    for (name, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pa, pc), name


@pytest.mark.parametrize("change", ["lr", "epochs", "identity"])
def test_a_checkpoint_of_another_run_is_not_resumed_from(tmp_path, change):
    """A changed learning rate, length (the schedule depends on it) or model config must not
    continue a killed run's weights and schedule: a warning names the key, and the run is the
    fresh run of the new configuration, bit for bit."""
    model, data = _setup()
    train(model, data, CFG, run_dir=tmp_path, progress=False, stop_after=5, identity={"model": {"width": 8}})
    cfg, identity = CFG, {"model": {"width": 8}}
    if change == "lr":
        cfg = replace(CFG, lr=CFG.lr / 2)
    elif change == "epochs":
        cfg = replace(CFG, epochs=CFG.epochs * 2)
    else:
        identity = {"model": {"width": 9}}
    model_b, data = _setup()
    with pytest.warns(UserWarning, match=r"another run.*" + {"lr": "train.lr", "epochs": "train.epochs",
                                                             "identity": "identity.model.width"}[change]):
        resumed = train(model_b, data, cfg, run_dir=tmp_path, progress=False, identity=identity)
    assert resumed.resumed_from == 0
    model_c, data = _setup()
    fresh = train(model_c, data, cfg, progress=False)
    for (name, pb), pc in zip(model_b.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pb, pc), name
    # The checkpoint is now the new run's: the same configuration resumes from it.
    again = train(_setup()[0], data, cfg, run_dir=tmp_path, progress=False, identity=identity)
    assert again.resumed_from == fresh.steps


def test_pipeline_run_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    assert pipeline_run_dir("MDEQ + JR") is None  # a plain notebook or nbval: no checkpoints
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    assert pipeline_run_dir("MDEQ + JR") == tmp_path / "MDEQ_JR"
    assert pipeline_run_dir("gamma_0.5") == tmp_path / "gamma_0.5"
    assert pipeline_run_dir("MDEQ + JR/seed1") == tmp_path / "MDEQ_JR" / "seed1"  # an arm's seed
    assert pipeline_run_dir("..") == tmp_path / "run"  # never a folder outside
    assert pipeline_run_dir("../..") == pipeline_run_dir("/") == tmp_path / "run" / "run"


def test_records_hold_solver_statistics_and_penalty():
    model, data = _setup()
    recs = train(model, data, CFG, progress=False).records
    assert all(1 <= r["fwd_nfe"] <= 6 and 1 <= r["bwd_nfe"] <= 6 for r in recs)
    penalized = [r for r in recs if not math.isnan(r["jac_fro"])]
    assert 0 < len(penalized) < len(recs)  # p = 0.5
    assert all(r["jac_fro"] >= 0 for r in penalized)


def test_penalty_lowers_the_jacobian():
    """Same seed and data; a penalty comparable to the loss (targets here reach ~25, so the
    MSE starts near 150) must end with a smaller ||J||_F at the equilibrium."""
    norms = {}
    for gamma in (0.0, 100.0):
        cfg = replace(CFG, epochs=6, jacobian=JacobianPenalty(gamma=gamma, p=1.0))
        model, data = _setup(cfg)
        train(model, data, cfg, progress=False)
        x = data.tensors[0][:64]
        _, stats = model.predict(x)
        z, fz = stats.jacobian_inputs()
        (vjp,) = torch.autograd.grad(fz, z, torch.ones_like(fz))  # d = 1: exact f'(z*)
        norms[gamma] = float(vjp.pow(2).mean().sqrt())
    assert norms[100.0] < 0.8 * norms[0.0], norms


def test_checkpoint_loads_into_a_fresh_model(tmp_path):
    model, data = _setup()
    train(model, data, replace(CFG, max_steps=3), run_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    fresh, _ = _setup()
    fresh.load_state_dict(state["model"])  # strict: keys match the code
    assert state["step"] == 3 and len(state["records"]) == 3


def test_max_steps_caps_the_run():
    model, data = _setup()
    assert train(model, data, replace(CFG, max_steps=5), progress=False).steps == 5


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine") == 0.1
    assert lr_factor(9, 100, 10, "cosine") == 1.0
    assert abs(lr_factor(10, 100, 10, "cosine") - 1.0) < 1e-12
    assert abs(lr_factor(55, 100, 10, "cosine") - 0.5) < 1e-12
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_per_process_state_is_loaded_only_for_its_own_step_and_world(tmp_path):
    """A process's own file (the LM's segment memory) from another step or world size is not
    used: the run warns and keeps the state of the main checkpoint."""
    import pytest

    from deqlib.train.checkpoint import atomic_save, load_rank_state

    class Inner(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def get_extra_state(self):
            return {"v": self.value}

        def set_extra_state(self, state):
            self.value = state["v"]

    class Holder(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.inner = Inner(value)

        @property
        def value(self):
            return self.inner.value

    path = tmp_path / "checkpoint.rank1.pt"
    atomic_save({"step": 5, "world": 2, "extra": {"inner._extra_state": {"v": 7}}}, path)
    for step, world in ((6, 2), (5, 4)):
        holder = Holder(1)
        with pytest.warns(UserWarning, match=f"step {step} of this {world}-process run"):
            load_rank_state(holder, path, step, world)
        assert holder.value == 1
    holder = Holder(1)
    load_rank_state(holder, path, 5, 2)
    assert holder.value == 7
    with pytest.warns(UserWarning, match="found none"):
        load_rank_state(holder, tmp_path / "missing.pt", 5, 2)


def test_gamma_schedule_runs_from_the_end_of_pretraining_to_the_last_step(tmp_path):
    """gamma = A when the penalty can first apply (the first equilibrium step), B at the last."""
    weights = []

    class Spy(JacobianPenalty):
        def weight(self, step, total_steps):
            weights.append(super().weight(step, total_steps))
            return weights[-1]

    cfg = replace(CFG, pretrain_steps=6, jacobian=Spy(gamma=1.0, gamma_end=3.0, p=1.0))
    model, data = _setup(cfg)
    res = train(model, data, cfg, progress=False)
    assert res.steps == 16 and [r["pretrain"] for r in res.records] == [1.0] * 6 + [0.0] * 10
    assert len(weights) == 10  # not drawn while pretraining
    assert weights[0] == pytest.approx(1.0) and weights[-1] == pytest.approx(3.0)
    assert weights == sorted(weights)


def test_each_process_gets_its_share_of_one_global_batch_and_its_own_random_draws():
    """Augmenting a share with the batch's generator gave the i-th example of every process's
    share the same draw; the shares must instead be slices of the one-process batch."""
    def noise(batch, gen):
        (x,) = batch
        return (x + torch.randn(x.shape, generator=gen),)

    data = TensorBatches((torch.zeros(40, 3),), 8, seed=1, transform=noise)
    (whole,) = data.batch(2, 1)
    shares = [data.batch(2, 1, rank=r, world=2)[0] for r in range(2)]
    for r, share in enumerate(shares):
        assert torch.equal(share, whole[r::2])
    assert not torch.equal(shares[0], shares[1])  # the same (zero) examples, drawn apart
    # dropout and probe streams: process 0 draws what one process draws, the others their own
    one = torch.rand(4, generator=rng(3, 5, 2))
    assert torch.equal(torch.rand(4, generator=step_rng(3, 5, 0)), one)
    assert not torch.equal(torch.rand(4, generator=step_rng(3, 5, 1)), one)


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _fresh_run(cfg=CFG):
    model, data = _setup(cfg)
    return model, train(model, data, cfg, progress=False)


def test_a_checkpoint_that_runs_code_when_loaded_is_not_loaded(tmp_path):
    """A planted ``checkpoint.pt`` whose unpickling would create a file: nothing is executed,
    a warning names the file, and the run is the fresh run, bit for bit."""
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"run": _RunsCode(marker), "step": 3}, run_dir / "checkpoint.pt")
    model, data = _setup()
    with pytest.warns(UserWarning, match=rf"cannot read the checkpoint {run_dir / 'checkpoint.pt'}"):
        res = train(model, data, CFG, run_dir=run_dir, progress=False)
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert res.resumed_from == 0
    fresh_model, fresh = _fresh_run()
    for (name, pa), pb in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(pa, pb), name
    # the planted file was overwritten by this run's own checkpoint, which resumes
    again = train(_setup()[0], data, CFG, run_dir=run_dir, progress=False)
    assert again.resumed_from == fresh.steps


def test_a_per_process_file_that_runs_code_is_not_loaded(tmp_path):
    from deqlib.train.checkpoint import load_rank_state

    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.rank1.pt"
    torch.save({"step": 5, "world": 2, "extra": _RunsCode(marker)}, path)
    with pytest.warns(UserWarning, match=rf"cannot read the checkpoint {path}"):
        load_rank_state(torch.nn.Linear(2, 2), path, 5, 2)
    assert not marker.exists(), "loading the per-process state ran its code"


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_warns_naming_it_and_the_run_starts_afresh(tmp_path, damage):
    """What a full disk or a copy cut short leaves: every rerun used to stop with an EOFError
    or OSError naming no file."""
    model, data = _setup()
    train(model, data, CFG, run_dir=tmp_path, progress=False, stop_after=5)
    path = tmp_path / "checkpoint.pt"
    blob = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else blob[: len(blob) // 2])
    model_b, data = _setup()
    with pytest.warns(UserWarning, match=rf"cannot read the checkpoint {path}.*starts afresh"):
        res = train(model_b, data, CFG, run_dir=tmp_path, progress=False)
    assert res.resumed_from == 0 and res.steps == 16
    fresh_model, _ = _fresh_run()
    for (name, pa), pb in zip(model_b.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_the_project_s_checkpoints_load_without_running_code(tmp_path):
    """Everything train() saves loads with ``weights_only=True`` (tensors and plain types only);
    a run identity holding a path or a NumPy number is saved as plain values and still resumes."""
    import numpy as np

    identity = {"data": {"root": tmp_path / "data", "fraction": np.float64(0.5)}}
    model, data = _setup()
    train(model, data, replace(CFG, max_steps=3), run_dir=tmp_path, progress=False, identity=identity)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["run"]["identity"] == {"data": {"root": str(tmp_path / "data"), "fraction": 0.5}}
    again = train(_setup()[0], data, replace(CFG, max_steps=3), run_dir=tmp_path, progress=False,
                  identity=identity)
    assert again.resumed_from == 3


def test_an_identity_that_cannot_be_saved_is_refused_naming_the_key(tmp_path):
    model, data = _setup()
    with pytest.raises(ValueError, match=r"identity\.model\.act"):
        train(model, data, CFG, run_dir=tmp_path, progress=False, identity={"model": {"act": torch.tanh}})
    assert not (tmp_path / "checkpoint.pt").exists()


def test_removing_a_pipeline_run_s_checkpoints_keeps_everything_else(monkeypatch, tmp_path):
    """Only the files the arms' training wrote go (and the folders that leaves empty); a user's
    files there stay, and so do the folders holding them."""
    from deqlib.experiments.core import remove_pipeline_checkpoints
    from deqlib.train import atomic_save, checkpoint_files

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "my_model.pt").write_text("mine")
    (root / "other").mkdir()
    (root / "other" / "checkpoint.pt").write_text("not an arm of this run")
    monkeypatch.setenv(RUN_DIR_ENV, str(root))
    arm_a, arm_b = pipeline_run_dir("gamma 0.5"), pipeline_run_dir("MDEQ + JR")
    for arm in (arm_a, arm_b):
        atomic_save({"step": 1}, arm / "checkpoint.pt")
        atomic_save({"step": 1}, arm / "checkpoint.rank1.pt")
    (arm_a / ".checkpoint.pt.tmp-999-abcd").write_bytes(b"a killed save")
    (arm_b / "notes.txt").write_text("mine too")
    assert [p.name for p in checkpoint_files(arm_a)] == [".checkpoint.pt.tmp-999-abcd", "checkpoint.pt",
                                                         "checkpoint.rank1.pt"]
    remove_pipeline_checkpoints(root)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "MDEQ_JR", "MDEQ_JR/notes.txt", "my_model.pt", "other", "other/checkpoint.pt"]
    remove_pipeline_checkpoints(root)  # nothing left of the run: a no-op
    (root / "my_model.pt").unlink()
    (root / "other" / "checkpoint.pt").unlink()
    (root / "other").rmdir()
    (arm_b / "notes.txt").unlink()
    monkeypatch.setenv(RUN_DIR_ENV, str(root))
    pipeline_run_dir("MDEQ + JR")
    remove_pipeline_checkpoints(root)
    assert not root.exists(), "a folder the run left empty is removed"


def test_a_monitor_joins_the_records_without_changing_the_run(tmp_path):
    """``monitor`` runs every k steps and after the last, in evaluation mode, and leaves the
    training draws alone: the monitored run ends with the unmonitored run's bits, and resumes
    exactly."""
    calls = []

    def monitor(model):
        calls.append(model.training)
        torch.rand(3)  # a monitor that draws from the global generator must not shift training's draws
        return {"mon_scale": float(sum(p.abs().sum() for p in model.parameters()))}

    model_a, data = _setup()
    train(model_a, data, CFG, progress=False)
    model_b, data = _setup()
    watched = train(model_b, data, CFG, progress=False, monitor=monitor, monitor_every=5)
    for pa, pb in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(pa, pb)
    steps = [r["step"] for r in watched.records if "mon_scale" in r]
    assert steps == [4, 9, 14, 15] and calls == [False] * 4
    model_c, data = _setup()
    train(model_c, data, CFG, run_dir=tmp_path, progress=False, stop_after=7, monitor=monitor, monitor_every=5)
    model_d, data = _setup()
    resumed = train(model_d, data, CFG, run_dir=tmp_path, progress=False, monitor=monitor, monitor_every=5)
    assert [r.get("mon_scale") for r in resumed.records] == [r.get("mon_scale") for r in watched.records]


def test_an_adaptive_gamma_moves_with_the_run_and_resumes_exactly(tmp_path):
    """The loop feeds the policy its measurement every step, trains with the controller's gamma,
    logs it, and keeps its state in the checkpoint: a resumed run ends bit for bit as the
    uninterrupted one, gammas included."""
    from deqlib.penalty_schedule import AdaptiveGamma

    cfg = replace(CFG, jacobian=JacobianPenalty(gamma=1.0, p=1.0, adaptive=AdaptiveGamma(target=1e-3, gain=0.5,
                                                                                         smoothing=1.0)))
    model_a, data = _setup(cfg)
    full = train(model_a, data, cfg, progress=False)
    gammas = [r["gamma"] for r in full.records]
    assert gammas[0] == 1.0 and gammas[-1] > gammas[0]  # ||J|| above a tiny target: gamma grows
    model_b, data = _setup(cfg)
    train(model_b, data, cfg, run_dir=tmp_path, progress=False, stop_after=7)
    model_c, data = _setup(cfg)
    rest = train(model_c, data, cfg, run_dir=tmp_path, progress=False)
    assert [r["gamma"] for r in rest.records] == gammas
    for pa, pc in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(pa, pc)


def test_the_penalty_stops_at_its_stop_epoch():
    """``stop_epoch`` (the official code's JAC_STOP_EPOCH): drawn on every step before it (p = 1),
    on none from it on, whatever the draw would have been."""
    cfg = replace(CFG, epochs=3, jacobian=JacobianPenalty(gamma=1.0, p=1.0, stop_epoch=2))
    model, data = _setup(cfg)
    records = train(model, data, cfg, progress=False).records
    drawn = {r["epoch"]: [] for r in records}
    for r in records:
        drawn[r["epoch"]].append(not math.isnan(r["jac_fro"]))
    assert drawn == {0: [True] * 8, 1: [True] * 8, 2: [False] * 8}
    penalty = JacobianPenalty(gamma=1.0, p=1.0, stop_epoch=2)
    assert penalty.applies(rng(0), epoch=1) and not penalty.applies(rng(0), epoch=2)
    assert penalty.applies(rng(0))  # no epoch given: no stop to apply
    with pytest.raises(ValueError, match="stop_epoch=0"):
        JacobianPenalty(stop_epoch=0)
