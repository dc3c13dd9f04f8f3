"""The tolerance mode of the notebook checks (pipelines.nbcheck): numbers within the tolerance
pass, words and numbers outside it fail, ignored cells are skipped, and a cell that runs too
long is named with the limit."""

import math

import nbformat
import pytest

from pipelines.nbcheck import check_notebook, compare_text, main


def test_equal_text_is_identical():
    assert compare_text("ppl 351.2\n", "ppl 351.2\n", 0.0, 0.0)[0] == "identical"


def test_numbers_within_the_tolerance_pass_and_report_the_largest_difference():
    status, worst, where = compare_text("ppl 351.2, acc 30.0%", "ppl 326.0, acc 30.3%", 0.1, 0.0)
    assert status == "within"
    assert worst == pytest.approx((351.2 - 326.0) / 351.2)
    assert where == "351.2 -> 326.0"


def test_column_padding_may_change_with_the_digits():
    assert compare_text("a    1.5\nbb  10.25", "a   1.52\nbb  10.3", 0.05, 0.0)[0] == "within"


def test_a_number_outside_the_tolerance_fails_naming_it():
    status, rel, detail = compare_text("NFE 8e-09", "NFE 1e-08", 0.1, 0.0)
    assert status == "differs" and rel == pytest.approx(0.25)
    assert "8e-09 became 1e-08" in detail


def test_words_must_match():
    status, rel, detail = compare_text("held: JR is faster", "not held: JR is faster", 1.0, 1.0)
    assert status == "differs" and math.isinf(rel) and "text differs" in detail
    assert compare_text("3 arms", "3 arms, 4 seeds", 1.0, 1.0)[0] == "differs"


def test_absolute_tolerance_covers_numbers_near_zero():
    assert compare_text("leak 0.0", "leak 1e-09", 0.0, 1e-6)[0] == "within"
    assert compare_text("leak 0.0", "leak 1e-09", 0.5, 0.0)[0] == "differs"


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for source, printed in cells:
        cell = nbformat.v4.new_code_cell(source)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)] if printed else []
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_a_rerun_notebook_is_compared_cell_by_cell_and_a_slow_cell_is_named(tmp_path, capsys):
    path = _notebook(tmp_path / "nb.ipynb", [
        ("print('loss', 0.5010)", "loss 0.5\n"),  # 0.2% off the committed number
        ("print('verdict: held')", "verdict: held\n"),
        ("# NBVAL_IGNORE_OUTPUT\nprint('step time', 0.123)", "step time 9.9\n"),
        ("print('acc', 31)", "acc 30\n"),  # 3.3% off
        ("import time\ntime.sleep(30)", ""),
    ])
    report = check_notebook(path, rtol=0.01, atol=0.0, timeout=3)
    assert [(c.index, c.status) for c in report.cells] == [(1, "within"), (2, "identical"), (4, "differs"),
                                                           (5, "timeout")]
    assert "30 became 31" in report.cells[2].detail
    assert "3 s limit" in report.cells[3].detail
    summary = report.summary(0.01, 0.0)
    assert "code cell 4: differs" in summary and "code cell 5: timeout" in summary and not report.ok


def test_the_command_refuses_bad_arguments_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.ipynb")])
    assert "no such notebook" in capsys.readouterr().err
    nb = _notebook(tmp_path / "nb.ipynb", [("1", "")])
    with pytest.raises(SystemExit):
        main([str(nb), "--rtol", "nan"])
    assert "--rtol must be" in capsys.readouterr().err
