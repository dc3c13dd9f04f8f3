"""deqlib.experiments.imagenet: the config's cross-checks, bad input refused by name before any
training, top-5 accuracy against the logits, and the command line ``accelerate launch`` runs."""

import json
import math

import pytest
import torch

from deqlib.config import load_experiment
from deqlib.data.imagenet import ImageNetDataConfig
from deqlib.deq import SolverSettings
from deqlib.experiments.image_classification import ClassificationEvalConfig, evaluate_equilibrium
from deqlib.experiments.imagenet import CLAIMS, ImageNetExperiment, load_data, main
from deqlib.models.mdeq import MDEQ, MDEQConfig
from conftest import ROOT
from test_imagenet_data import _folder, _jpeg

TINY_MODEL = MDEQConfig(channels=(4, 8), expansion=2, groups=2, dropout=0.0, downsample=1, head_channels=(4, 8),
                        final_channels=8, num_classes=3, image_size=8, init_std=None)


def _exp(folder, **kw) -> ImageNetExperiment:
    data = ImageNetDataConfig(root=str(folder.parent), folder=folder.name, train_size=8, eval_size=8, eval_resize=10,
                              workers=0)
    return ImageNetExperiment(data=data, model=kw.pop("model", TINY_MODEL), **kw)


def test_both_profiles_load_and_the_paper_profile_is_table4():
    cfg = load_experiment(ImageNetExperiment, "imagenet", "paper", params_path=ROOT / "params.yaml")
    t, m = cfg.train, cfg.model
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.weight_decay, t.schedule) == (120, 112, "sgd", 0.05, 5e-5,
                                                                                       "cosine")
    assert m.channels == (32, 64, 128, 256) and m.downsample == 2 and m.dropout == 0.02 and m.weight_norm
    assert (m.image_size, m.num_classes, m.init_std) == (224, 1000, 0.01)
    assert (t.forward.max_iter, t.backward.max_iter, t.forward.tol, t.backward.tol) == (14, 14, 1e-3, 1e-4)
    assert (t.jacobian.gamma, t.jacobian.gamma_end, t.jacobian.p) == (2.0, 3.0, 0.1)
    assert cfg.data.root == "" and (cfg.data.train_size, cfg.data.eval_resize) == (224, 256)
    assert cfg.data.scale == (0.08, 1.0) and cfg.data.flip
    small = load_experiment(ImageNetExperiment, "imagenet", "small", params_path=ROOT / "params.yaml")
    assert small.model.num_classes == 10 and small.data.folder == "imagenette-slice" and len(small.seeds) >= 3


@pytest.mark.parametrize("kw, named", [
    ({"model": MDEQConfig(channels=(4, 8), groups=2, head_channels=(4, 8), final_channels=8, image_size=16,
                          downsample=1)}, "model.image_size"),
    ({"model": MDEQConfig(channels=(4, 8), groups=2, head_channels=(4, 8), final_channels=8, image_size=8,
                          downsample=1, in_channels=1)}, "model.in_channels"),
    ({"seeds": (0, 0)}, "seeds"),
    ({"eval": ClassificationEvalConfig(nfe=(1, 2), compare_nfe=2, nfe_cap=1)}, "eval.nfe_cap"),
])
def test_config_refuses_inconsistent_settings_by_name(tmp_path, kw, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        _exp(tmp_path / "x", **kw)


def test_bad_input_is_refused_before_training(tmp_path):
    folder = _folder(tmp_path / "tiny")
    with pytest.raises(ValueError, match="4 classes|num_classes"):
        load_data(_exp(folder, model=MDEQConfig(**{**TINY_MODEL.__dict__, "num_classes": 4})))
    with pytest.raises(ValueError, match=str(tmp_path / "missing")):
        load_data(_exp(tmp_path / "missing"))
    (folder / "train" / "n00000002" / "n00000002_0.JPEG").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="n00000002_0.JPEG"):
        load_data(_exp(folder))


def test_top5_and_top1_agree_with_the_logits(tmp_path):
    """With more than five classes, each image's top-1 and top-5 hits are those of the logits
    of the same capped solve."""
    classes = tuple(f"n0000000{c}" for c in range(7))
    folder = _folder(tmp_path / "seven", classes=classes, n_train=1, n_val=3)
    model_cfg = MDEQConfig(**{**TINY_MODEL.__dict__, "num_classes": 7})
    exp = _exp(folder, model=model_cfg)
    data = load_data(exp)
    torch.manual_seed(0)
    model = MDEQ(model_cfg, SolverSettings("anderson", 4, 1e-3), SolverSettings("anderson", 4, 1e-4)).eval()
    ev = ClassificationEvalConfig(batch_size=8, nfe=(1, 3), compare_nfe=3, nfe_cap=6, plain_cap=6)
    metrics, outcomes = evaluate_equilibrium(model, data.eval_batches(), ev)
    source = data.eval_batches()
    x, y = source.batch(0, source.n_items)
    with torch.no_grad():
        logits, _ = model.predict(x, forward_solver=SolverSettings("anderson", 3, 1e-3))
    rank = (logits > logits.gather(1, y[:, None])).sum(1)  # classes scored above the true one
    assert outcomes["correct_nfe_3"].tolist() == (rank == 0).tolist()
    assert outcomes["correct_top5_nfe_3"].tolist() == (rank < 5).tolist()
    assert metrics["acc_top5_nfe_3"] == float((rank < 5).double().mean()) >= metrics["acc_nfe_3"]
    assert math.isclose(metrics["acc_top5"], float(outcomes["correct_top5"].double().mean()))
    assert metrics["n_test"] == 21


def test_three_classes_report_no_top5(tmp_path):
    folder = _folder(tmp_path / "tiny", n_train=1, n_val=1)
    exp = _exp(folder)
    torch.manual_seed(0)
    model = MDEQ(TINY_MODEL, SolverSettings("anderson", 2, 1e-3), SolverSettings("anderson", 2, 1e-4))
    metrics, outcomes = evaluate_equilibrium(model, load_data(exp).eval_batches(),
                                             ClassificationEvalConfig(nfe=(1,), compare_nfe=1, nfe_cap=2, plain_cap=2))
    assert "acc_top5" not in metrics and set(outcomes) == {"correct", "correct_nfe_1"}


def test_claims_name_the_imagenet_figures():
    assert "74.5%" in CLAIMS["close"].source and "27" in CLAIMS["nfe"].source
    assert CLAIMS["close"].text and CLAIMS["close"].direction == "greater"


def _params(tmp_path, folder) -> str:
    """A params.yaml whose small profile is a tiny run on ``folder``."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    small = params["imagenet"]["small"]
    small["data"].update(root=str(folder.parent), folder=folder.name, train_size=8, eval_size=8, eval_resize=10,
                         preload=False)
    small["model"].update(channels=[4, 8], head_channels=[4, 8], final_channels=8, groups=2, post_groups=2,
                          num_classes=3, image_size=8, downsample=1)
    small["train"].update(max_steps=2, batch_size=4)
    small["eval"].update(nfe=[1, 2], compare_nfe=2, nfe_cap=3, plain_cap=3, jac_batch=2, radius_iters=3,
                         radius_vectors=2, memory_batch=2, monitor_every=0)
    small["seeds"] = [0]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_command_line_trains_each_arm_and_prints_its_metrics(tmp_path, capsys):
    folder = _folder(tmp_path / "tiny")
    params = _params(tmp_path, folder)
    assert main(["--profile", "small", "--params", params, "--arm", "MDEQ + JR", "--run-dir",
                 str(tmp_path / "runs")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(d["arm"], d["seed"]) for d in lines] == [("MDEQ + JR", 0)]
    assert lines[0]["train_steps"] == 2 and lines[0]["n_test"] == 6
    assert (tmp_path / "runs" / "MDEQ + JR" / "seed0" / "checkpoint.pt").exists()


@pytest.mark.parametrize("args, named", [
    (["--arm", "ResNet"], "ResNet"),
    (["--set", "train.lr=-1"], "lr"),
])
def test_command_line_refuses_bad_input_with_status_2(tmp_path, capsys, args, named):
    folder = _folder(tmp_path / "tiny")
    assert main(["--profile", "small", "--params", _params(tmp_path, folder), *args]) == 2
    assert named in capsys.readouterr().err


def test_command_line_names_a_missing_folder(tmp_path, capsys):
    params = _params(tmp_path, tmp_path / "nowhere")
    assert main(["--profile", "small", "--params", params]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "prepare" in err


def test_unreadable_jpeg_is_named(tmp_path):
    folder = _folder(tmp_path / "tiny")
    _jpeg(folder / "val" / "n00000001" / "extra.JPEG")
    (folder / "val" / "n00000001" / "extra.JPEG").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    with pytest.raises(ValueError, match="extra.JPEG"):
        load_data(_exp(folder))
