"""Metric and curve files are written whole: a failed write keeps the previous file and leaves
no temporary beside it."""

import json

import pytest

from deqlib.report import write_curves, write_metrics


class Unprintable:
    def __str__(self):
        raise RuntimeError("cannot format")


def test_a_failed_curve_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    write_curves(tmp_path, "curves.csv", [{"step": 0, "loss": 1.0}])
    before = (tmp_path / "curves.csv").read_text()
    with pytest.raises(RuntimeError, match="cannot format"):
        write_curves(tmp_path, "curves.csv", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": Unprintable()}])
    assert (tmp_path / "curves.csv").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.csv"]


def test_metrics_are_written_whole_with_non_finite_numbers_as_null(tmp_path):
    write_metrics(tmp_path, {"a": {"loss": float("nan"), "acc": 0.5}})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": {"acc": 0.5, "loss": None}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_departures_lists_every_differing_setting_by_dotted_key():
    from deqlib.report import departures, flatten

    assert flatten({"a": {"b": 1, "c": {}}, "d": 2}) == {"a.b": 1, "a.c": {}, "d": 2}
    rows = departures({"train": {"lr": 1e-3, "epochs": 2}, "seeds": [0]},
                      {"train": {"lr": 1e-3, "epochs": 200}, "x": 1})
    assert rows == [{"setting": "seeds", "paper profile": "-", "this run": "[0]"},
                    {"setting": "train.epochs", "paper profile": "200", "this run": "2"},
                    {"setting": "x", "paper profile": "1", "this run": "-"}]
    assert departures({"a": 1}, {"a": 1}) == []
