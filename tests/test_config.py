"""params.yaml -> typed configs: every profile builds; unknown keys and bad values are named."""

import argparse
import collections.abc
import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import pytest
import yaml

from deqlib.config import (PROFILES, apply_overrides, build, load_experiment, load_params, load_yaml, parse_override,
                           to_dict, training_identity)
from deqlib.experiments.cifar import CifarExperiment
from deqlib.experiments.memory import MemoryExperiment
from deqlib.experiments.solver_study import SolversExperiment
from deqlib.experiments.imagenet import ImageNetExperiment
from deqlib.experiments.synthetic import SyntheticExperiment
from deqlib.experiments.weight_decay import WeightDecayExperiment
from deqlib.experiments.wikitext import WikiTextExperiment
from deqlib.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = {"synthetic": SyntheticExperiment, "cifar10": CifarExperiment, "imagenet": ImageNetExperiment,
               "solvers": SolversExperiment,
               "wikitext": WikiTextExperiment, "memory": MemoryExperiment, "weight_decay": WeightDecayExperiment}


def test_default_profile_is_paper():
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["profile"] == "paper"


def test_yaml_booleans_are_yaml_1_2():
    assert load_yaml("a: no\nb: off\nc: yes\nd: true\ne: False\nf: 0.5") == \
        {"a": "no", "b": "off", "c": "yes", "d": True, "e": False, "f": 0.5}


def test_yaml_floats_are_yaml_1_2_and_integers_stay_integers():
    # YAML 1.1 (PyYAML's default) reads all but the last two as strings.
    text = "a: 1e-05\nb: 1e-3\nc: 1.0e5\nd: -2E+3\ne: .5e-2\nf: 3\ng: 1_000\nh: 2.5\ni: 1e"
    assert load_yaml(text) == {"a": 1e-5, "b": 1e-3, "c": 1e5, "d": -2000.0, "e": 5e-3, "f": 3, "g": 1000,
                               "h": 2.5, "i": "1e"}
    assert isinstance(load_yaml("f: 3")["f"], int)


def test_yaml_integers_are_read_as_dvc_reads_them():
    """YAML 1.1 reads ``010`` as octal 8 and ``1:30`` as 90; ruamel (what ``dvc exp run -S``
    reads and writes with) as 10 and a string."""
    text = "a: 010\nb: 1:30\nc: 0o10\nd: 0x1F\ne: 0b11\nf: -3\ng: +4\nh: 0_10"
    expected = {"a": 10, "b": "1:30", "c": 8, "d": 31, "e": 3, "f": -3, "g": 4, "h": 10}
    assert load_yaml(text) == expected
    from ruamel.yaml import YAML

    assert dict(YAML(typ="rt").load(text)) == expected


@pytest.mark.parametrize("profile", PROFILES)
def test_params_read_the_same_after_dvc_rewrites_them(profile, tmp_path):
    """`dvc exp run -S profile=small` re-dumps params.yaml with ruamel (YAML 1.2), which drops
    the quotes of strings like "no"; every experiment must still build the same config."""
    ruamel = pytest.importorskip("ruamel.yaml")
    rt = ruamel.YAML()  # round-trip mode, as DVC writes
    with open(ROOT / "params.yaml") as fh:
        data = rt.load(fh)
    data["profile"] = "small"
    rewritten = tmp_path / "params.yaml"
    with open(rewritten, "w") as fh:
        rt.dump(data, fh)
    for name, cls in EXPERIMENTS.items():
        before = load_experiment(cls, name, profile, params_path=ROOT / "params.yaml")
        after = load_experiment(cls, name, profile, params_path=rewritten)
        assert to_dict(after) == to_dict(before), name
    # `-S cifar10.<profile>.train.backward.tol=1e-5`: ruamel writes it as 1e-05, no dot.
    data["cifar10"][profile]["train"]["backward"]["tol"] = 1e-5
    with open(rewritten, "w") as fh:
        rt.dump(data, fh)
    assert "tol: 1e-05" in rewritten.read_text()
    cfg = load_experiment(CifarExperiment, "cifar10", profile, params_path=rewritten)
    assert cfg.train.backward.tol == 1e-5


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_builds(experiment, profile):
    cfg = load_experiment(EXPERIMENTS[experiment], experiment, profile, params_path=ROOT / "params.yaml")
    assert isinstance(cfg, EXPERIMENTS[experiment])


def test_synthetic_paper_profile_is_table4():
    cfg = load_experiment(SyntheticExperiment, "synthetic", "paper", params_path=ROOT / "params.yaml")
    t = cfg.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.schedule) == (50, 64, "adam", 1e-3, "cosine")
    assert (t.forward.max_iter, t.backward.max_iter, t.forward.tol, t.backward.tol) == (6, 6, 1e-3, 1e-4)
    assert (t.jacobian.p, t.jacobian.n_probes) == (0.4, 1)
    assert cfg.arms.gammas == (0.0, 1.0, 2.0, 4.0) and len(cfg.seeds) >= 3
    assert (cfg.data.n_train, cfg.data.n_valid, cfg.model.hidden, cfg.model.init_std) == (4096, 1000, 50, 0.01)
    assert cfg.data.targets == "raw"  # the supplement's reading; the small profile documents its own


def test_cifar10_paper_profile_is_table4():
    cfg = load_experiment(CifarExperiment, "cifar10", "paper", params_path=ROOT / "params.yaml")
    t, m = cfg.train, cfg.model
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.schedule) == (200, 96, "adam", 1e-3, "cosine")
    assert m.channels == (28, 56, 112, 224) and m.dropout == 0.25 and m.downsample == 0
    assert m.weight_norm and m.init_std == 0.01
    assert (t.forward.max_iter, t.backward.max_iter, t.forward.tol, t.backward.tol) == (7, 8, 1e-3, 1e-4)
    assert (t.jacobian.gamma, t.jacobian.gamma_end, t.jacobian.p, t.jacobian.n_probes) == (0.5, None, 0.05, 1)
    assert cfg.data.root == "" and cfg.data.download and cfg.data.augment and cfg.data.pad == 4
    assert cfg.eval.tol == 1e-3 and cfg.eval.nfe[:6] == (1, 2, 3, 4, 5, 6)


def test_wikitext_paper_profile_is_table4():
    cfg = load_experiment(WikiTextExperiment, "wikitext", "paper", params_path=ROOT / "params.yaml")
    t, m = cfg.train, cfg.model
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.schedule) == (23, 60, "adam", 2.5e-4, "cosine")
    assert t.warmup_steps > 0 and t.pretrain_steps > 0
    assert (t.forward.max_iter, t.backward.max_iter, t.forward.tol, t.backward.tol) == (12, 12, 1e-3, 1e-4)
    assert (t.jacobian.gamma, t.jacobian.gamma_end, t.jacobian.p) == (1.6, 2.5, 0.35)
    assert (m.d_model, m.n_head, m.d_head, m.tgt_len, m.mem_len, m.dropout) == (700, 10, 70, 150, 150, 0.06)
    assert (m.cutoffs, m.div_val, m.d_inner, m.n_layer) == ((20000, 40000, 200000), 4.0, 48000, 18)
    assert cfg.eval.memory_batch == 15 and cfg.eval.max_tokens is None
    assert (cfg.data.folder, cfg.data.eval_file, cfg.data.download) == ("wikitext-103", "wiki.test.tokens", True)
    # Table 1 / Table 5's rows: unregularized at 30 / 30 (and the reduced 20 / 20), Pre-LN + JR at
    # 14 / 14, Post-LN + JR at Table 4's 12 / 12 with the official code's jitter of 0-2
    assert set(cfg.arms) == {"post_ln", "post_ln_reduced", "pre_ln", "post_ln_jr", "pre_ln_jr", "explicit"}
    assert [(cfg.threshold(a).forward, cfg.threshold(a).backward) for a in cfg.arms[:-1]] == [
        (30, 30), (20, 20), (30, 30), (12, 12), (14, 14)]
    assert cfg.threshold("post_ln_jr").jitter == 2 and cfg.threshold("post_ln").jitter == 0
    small = load_experiment(WikiTextExperiment, "wikitext", "small", params_path=ROOT / "params.yaml")
    assert (small.data.train_file, small.data.eval_file) == ("valid.txt", "test.txt")
    assert set(small.arms) == set(cfg.arms) and len(small.seeds) >= 3


@pytest.mark.parametrize(
    "section, message",
    [
        ({"train": {"stop_mode": "abs"}}, r"unknown key\(s\) \['stop_mode'\] in x.train"),
        ({"train": {"forward": {"f_stop_mode": "abs"}}}, r"'f_stop_mode'.*x.train.forward"),
        ({"train": {"lr": -1.0}}, r"x.train.*lr=-1.0"),
        ({"train": {"epochs": 0}}, r"epochs=0"),
        ({"train": {"jacobian": {"p": 1.5}}}, r"x.train.jacobian.*p=1.5"),
        ({"train": {"forward": {"tol": 0}}}, r"tol=0"),
        ({"data": {"noise_var": -1}}, r"noise_var=-1"),
        ({"arms": {"gammas": [-1.0]}}, r"gammas"),
        # The arms' gammas are arms.gammas: a weight in train.jacobian would be replaced unseen.
        ({"train": {"jacobian": {"gamma": 0.5}}}, r"gamma=0.5.*arms.gammas"),
        ({"train": {"jacobian": {"gamma_end": 2.0}}}, r"gamma_end=2.0.*arms.gammas"),
        ({"model": {"hidden": 0}}, r"hidden=0"),
        # A section given as a plain value fails here, not at its first use inside a run.
        ({"train": {"forward": "anderson"}}, r"x.train.forward must be a section.*'anderson'"),
        ({"train": None}, r"x.train must be a section.*None"),
        ({"model": 3}, r"x.model must be a section.*3"),
    ],
)
def test_bad_sections_are_rejected_naming_the_value(section, message):
    with pytest.raises(ValueError, match=message):
        build(SyntheticExperiment, section, "x")


def test_overrides_set_defaults_and_typos_fail():
    section = {"train": {"epochs": 3}}
    cfg = build(SyntheticExperiment, apply_overrides(section, {"train.max_steps": 5}))
    assert cfg.train.max_steps == 5 and cfg.train.epochs == 3
    with pytest.raises(ValueError, match="max_step"):
        build(SyntheticExperiment, apply_overrides(section, {"train.max_step": 5}))
    with pytest.raises(ValueError, match="profile"):
        load_experiment(SyntheticExperiment, "synthetic", "large", params_path=ROOT / "params.yaml")


def test_train_config_rejects_unknown_choices():
    for kwargs, name in [({"optimizer": "lamb"}, "optimizer"), ({"schedule": "step"}, "schedule"),
                         ({"mixed_precision": "fp8"}, "mixed_precision"), ({"grad_clip": 0}, "grad_clip")]:
        with pytest.raises(ValueError, match=name):
            TrainConfig(**kwargs)


def test_a_checkpoint_identity_leaves_out_only_the_evaluation_settings():
    """Changing how a trained arm is measured must not discard its training (the identity
    decides whether a checkpoint is resumed from); anything that changes training must."""
    base = build(SyntheticExperiment, {})
    evaluated = build(SyntheticExperiment, {"eval": {"nfe_cap": 50, "plain_cap": 30}})
    trained = build(SyntheticExperiment, {"train": {"lr": 0.01}})
    resampled = build(SyntheticExperiment, {"data": {"seed": 1}})
    assert training_identity(evaluated) == training_identity(base)
    assert training_identity(trained) != training_identity(base)
    assert training_identity(resampled) != training_identity(base)


@pytest.mark.parametrize("key, value", [("data.download", "no"), ("data.augment", "off"),
                                        ("model.weight_norm", 0)])
def test_a_switch_must_be_true_or_false(key, value):
    """``no`` and ``off`` are strings in YAML 1.2 (as ``dvc exp run -S`` writes them), and a
    string is truthy: ``--set data.download=no`` would have downloaded."""
    assert parse_override(f"{key}={value}")[1] == value  # not read as a boolean
    with pytest.raises(ValueError, match=rf"x\.{key} must be true or false, got x\.{key}={value!r}"):
        build(CifarExperiment, apply_overrides({}, {key: value}), "x")
    cfg = build(CifarExperiment, apply_overrides({}, {key: False}), "x")
    section, field = key.split(".")
    assert getattr(getattr(cfg, section), field) is False


def _leaf_keys(cls, prefix=""):
    """``(dotted key, type)`` of every value a config class takes, sections walked into."""
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        tp = hints[fld.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        sub = tp if dataclasses.is_dataclass(tp) else next((a for a in args if dataclasses.is_dataclass(a)), None)
        if sub is not None:
            yield from _leaf_keys(sub, f"{prefix}{fld.name}.")
        else:
            yield f"{prefix}{fld.name}", (args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp)


def _wrong_values(tp):
    """Values of the wrong kind for a key of type ``tp``: what each key must refuse by name."""
    if tp is bool:
        return ["no", 0]
    if tp is int:
        return [2.0, "3", math.inf]  # 2.0: the whole float every other integer key refused
    if tp is float:
        return ["abc", math.inf, math.nan, True]  # no config key has a use for infinity
    if tp is str:
        return [3, ["a"]]
    if typing.get_origin(tp) is tuple:
        elem = typing.get_args(tp)[0]
        return {int: [[2.0], "12"], float: [["abc"], [math.inf]], str: [[3], "abc"]}[elem]
    if typing.get_origin(tp) is collections.abc.Mapping:
        return [3]
    raise AssertionError(f"no wrong values for {tp}")


def _key_cases():
    for name, cls in sorted(EXPERIMENTS.items()):
        for key, tp in _leaf_keys(cls):
            for value in _wrong_values(tp):
                yield pytest.param(name, key, value, id=f"{name}.{key}={value!r}")


_SMALL = {name: load_params(ROOT / "params.yaml")[name]["small"] for name in EXPERIMENTS}


@pytest.mark.parametrize("experiment, key, value", list(_key_cases()))
def test_every_key_refuses_a_wrong_value_naming_the_key(experiment, key, value):
    """Every key, however deep, is checked by type before any comparison, and its message names
    it: ``in <section>: <key> must be ..., got <key>=<value>``. A float key given a string named
    only its section (a TypeError from a comparison), an integer key took 2.0 (then failed
    inside a run), a float key took infinity."""
    section, _, leaf = key.rpartition(".")
    where = f"{experiment}.small" + (f".{section}" if section else "")
    with pytest.raises(ValueError) as info:
        build(EXPERIMENTS[experiment], apply_overrides(_SMALL[experiment], {key: value}), f"{experiment}.small")
    message = str(info.value)
    shown = [repr(value)] + ([repr(tuple(value))] if isinstance(value, list) else [])
    assert where in message and " must be " in message, message
    assert any(f"{leaf}={s}" in message for s in shown), message


@pytest.mark.parametrize("key, value, message", [
    ("eval.method", "newton", r"method must be one of \['anderson', 'broyden', 'fixed_point'\], got method='newton'"),
    ("eval.tol", math.inf, r"tol must be a finite number in \(0, 1\), got tol=inf"),
    ("eval.tol", 1.5, r"tol must be .*, got tol=1.5"),  # a relative residual: 1 or more is every iterate
    ("eval.plain_cap", 1, r"plain_cap must be an integer >= 2, got plain_cap=1"),
    ("eval.nfe_cap", 2.0, r"nfe_cap must be an integer >= 2, got nfe_cap=2.0"),
])
def test_synthetic_eval_keys_are_checked_before_any_arm_trains(key, value, message):
    """Each was found only after an arm had trained (method, tol); a bad budget for the plain
    iteration measured after training would cost every arm."""
    with pytest.raises(ValueError, match=r"in synthetic\.small\.eval: " + message):
        load_experiment(SyntheticExperiment, "synthetic", "small", {key: value}, params_path=ROOT / "params.yaml")


def test_an_integer_solver_budget_refuses_a_whole_float():
    """``train.forward.max_iter=2.0`` was accepted, then pretraining's ``range(max_iter)``
    failed with a TypeError naming no key."""
    with pytest.raises(ValueError, match=r"in synthetic\.small\.train\.forward: max_iter must be an integer >= 1, "
                                         r"got max_iter=2\.0"):
        load_experiment(SyntheticExperiment, "synthetic", "small", {"train.forward.max_iter": 2.0},
                        params_path=ROOT / "params.yaml")


@pytest.mark.parametrize("text, line, problem", [
    ("profile: small\nsynthetic:\n  small: {train: {lr: 0.1}\n  paper: {}\n", 4, r"expected ',' or '\}'"),
    ("profile: small\nsynthetic:\n  small:\n    train: {lr: 0.1}\n    train: {lr: 0.2}\n", 5,
     r"duplicate key \"train\""),
    ("profile: small\nprofile: paper\n", 2, r"duplicate key \"profile\""),
])
def test_a_broken_params_file_is_named_with_its_line(tmp_path, text, line, problem):
    """A syntax error pointed to "<unicode string>", and a duplicate key was read (the last one
    won) where DVC calls the same file corrupted."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    pattern = re.escape(str(path)) + rf", line {line}, column \d+: .*{problem}"
    with pytest.raises(ValueError, match=pattern):
        load_params(path)
    with pytest.raises(ValueError, match=pattern):
        load_experiment(SyntheticExperiment, "synthetic", "small", params_path=path)


def test_params_are_read_safely(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r", line 1, column \d+: .*python/object"):
        load_params(path)


def test_overrides_are_read_as_the_params_file_is_and_a_broken_one_is_a_usage_error():
    for text, value in [("a=no", "no"), ("a=1e-05", 1e-5), ("a=010", 10), ("a=1:30", "1:30"), ("a=[1, 2]", [1, 2]),
                        ("a=true", True), ("a=null", None), ("a=abc", "abc"), ("a=.inf", math.inf)]:
        assert parse_override(text) == ("a", value), text
    for text in ("train.lr=[1, 2", "x={a: 1, a: 2}"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"--set {text!r}") + r", line 1, column \d+"):
            parse_override(text)


def test_params_yaml_has_no_anchors_or_aliases():
    """``small: *synthetic`` made the two profiles one object for DVC: ``dvc exp run -S
    synthetic.small.train.lr=0.01`` changed the paper profile too, and overrides of one profile
    were dropped. Each profile block is written out in full."""
    from ruamel.yaml import YAML
    from ruamel.yaml.events import AliasEvent

    events = list(YAML().parse((ROOT / "params.yaml").read_text()))
    aliases = [e.anchor for e in events if isinstance(e, AliasEvent)]
    anchors = [e.anchor for e in events if not isinstance(e, AliasEvent) and getattr(e, "anchor", None)]
    assert not aliases and not anchors, (anchors, aliases)


_SEED_KEY = {"synthetic": ("data", "seed"), "cifar10": ("eval", "jac_batch"),
             "imagenet": ("eval", "jac_batch"), "wikitext": ("eval", "max_tokens"),
             "solvers": ("seed",), "memory": ("seed",), "weight_decay": ("mdeq", "eval", "monitor_every")}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
@pytest.mark.parametrize("profile", PROFILES)
def test_a_dvc_override_of_one_profile_leaves_the_other_unchanged(experiment, profile, tmp_path):
    """What ``dvc exp run -S`` does to params.yaml: load it with ruamel's round-trip loader, set
    one profile's key (or add one, ``-S +...``), dump it back."""
    from ruamel.yaml import YAML

    cls = EXPERIMENTS[experiment]
    other = next(p for p in PROFILES if p != profile)
    before = to_dict(load_experiment(cls, experiment, other, params_path=ROOT / "params.yaml"))
    rt = YAML()
    data = rt.load((ROOT / "params.yaml").read_text())
    *section, leaf = _SEED_KEY[experiment]
    node = data[experiment][profile]
    for part in section:
        node = node[part]
    node[leaf] = 12345
    rewritten = tmp_path / "params.yaml"
    with open(rewritten, "w") as fh:
        rt.dump(data, fh)
    changed = to_dict(load_experiment(cls, experiment, profile, params_path=rewritten))
    for part in _SEED_KEY[experiment]:
        changed = changed[part]
    assert changed == 12345
    assert to_dict(load_experiment(cls, experiment, other, params_path=rewritten)) == before
    # `-S +<experiment>.<profile>...max_stepz=2`: a new key lands in that profile, and is refused there
    node["max_stepz"] = 2
    with open(rewritten, "w") as fh:
        rt.dump(data, fh)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_stepz'\] in " + rf"{experiment}\.{profile}"):
        load_experiment(cls, experiment, profile, params_path=rewritten)
    assert to_dict(load_experiment(cls, experiment, other, params_path=rewritten)) == before
