"""The pipeline end to end: nbval on the committed notebooks, and each experiment's paper
profile starting and training a few steps on a CPU with tiny data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEFAULT_RTOL, ROOT, RTOL_ENV, skip_without_slice
from deqlib.config import load_params
from deqlib.data import DATA_ENV
from deqlib.numerics import PINNED_ENV, pinned_environ
from pipelines.run import NOTEBOOKS, absolute_data_env, run

# A step limit and tiny data per experiment: enough to start, train and write every output.
PAPER_SMOKE = {
    "synthetic": {"train.max_steps": 3, "data.n_train": 256, "data.n_valid": 64, "eval.nfe_cap": 20},
    "cifar10": {"data.root": "../shared/data/cifar-10-subset", "data.download": False, "data.n_test": 8,
                "train.max_steps": 2, "train.batch_size": 4, "eval.batch_size": 8, "eval.nfe": [1, 2],
                "eval.nfe_cap": 4},
    "solvers": {"synthetic.batch": 64, "conv.batch": 2, "conv.channels": 16, "conv.size": 8,
                "conv.groups": 4, "hard_nfe": [50, 80], "repeats": 1, "radius_iters": 10,
                "mdeq.batch": 2, "mdeq.channels": [16, 32], "mdeq.expansion": 2, "mdeq.image_size": 16,
                "mdeq.downsample": 1, "transformer.batch": 2, "transformer.d_model": 32, "transformer.n_head": 2,
                "transformer.d_head": 16, "transformer.d_inner": 64, "transformer.tgt_len": 8,
                "transformer.mem_len": 8, "contract_steps": 30},
    # WikiText-103 (and its 267K vocabulary) is not here: the WikiText-2 slice stands in, and the
    # 98M-parameter model shrinks to what a CPU trains for 3 steps (cutoffs inside the slice's
    # 13,777 words, an 18 -> 2 layer explicit stack, 2,000 evaluation tokens).
    "wikitext": {"train.max_steps": 3, "train.batch_size": 4, "train.pretrain_steps": 1,
                 "data.root": "../shared/data/wikitext-2", "data.folder": "", "data.train_file": "valid.txt",
                 "data.eval_file": "test.txt", "data.download": False,
                 "model.d_model": 32, "model.n_head": 2, "model.d_head": 16, "model.d_inner": 64,
                 "model.tgt_len": 16, "model.mem_len": 16, "model.cutoffs": [2000, 8000], "model.n_layer": 2,
                 "eval.max_tokens": 2000, "eval.nfe_caps": [2, 4], "eval.batch_size": 4},
}


def test_every_notebook_has_a_smoke_override():
    assert set(PAPER_SMOKE) == set(NOTEBOOKS)


@pytest.mark.parametrize("experiment", sorted(NOTEBOOKS))
def test_paper_profile_starts_and_trains_on_cpu(experiment, tmp_path):
    skip_without_slice(PAPER_SMOKE[experiment].get("data.root", ""))
    nb = run(experiment, profile="paper", overrides=PAPER_SMOKE[experiment], out=tmp_path)
    assert nb == tmp_path / "notebook.ipynb" and nb.exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics, "the notebook wrote no metrics"
    assert (tmp_path / "curves.csv").read_text().count("\n") > 1
    executed = json.loads(nb.read_text())
    params = next(c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert '"paper"' in "".join(params["source"])
    # every output the DVC stage declares is written (else `dvc repro` fails after the run)
    for declared in _declared_outputs(experiment):
        assert (tmp_path / declared).exists(), f"dvc.yaml declares outputs/{experiment}/{declared}; not written"
    assert not (tmp_path / "checkpoints").exists(), "a finished run leaves no checkpoints behind"
    # every plot's x, y and the fields its template draws by (an arm per line) are columns
    for name, fields in _plot_fields(experiment).items():
        header = (tmp_path / name).read_text().splitlines()[0].split(",")
        assert fields <= set(header), f"{name}: the plot needs {sorted(fields - set(header))}"


def test_a_killed_pipeline_run_resumes_its_finished_arms(tmp_path, monkeypatch):
    """Kill after training (the checkpoints are left, as a kill leaves them); the next run
    of the same configuration resumes every arm from them instead of training it again (its
    checkpoints are not rewritten), then removes them."""
    import pipelines.run as runner

    real_rmtree = runner.shutil.rmtree
    monkeypatch.setattr(runner.shutil, "rmtree", lambda *a, **k: None)  # as if killed before cleanup
    run("synthetic", profile="paper", overrides=PAPER_SMOKE["synthetic"], out=tmp_path)
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("checkpoint.pt")}
    assert len(first) >= 2, first  # one per gamma arm
    seen = {}

    def rmtree(path, *args, **kwargs):
        seen.update({p: p.stat().st_mtime_ns for p in Path(path).rglob("checkpoint.pt")})
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(runner.shutil, "rmtree", rmtree)
    run("synthetic", profile="paper", overrides=PAPER_SMOKE["synthetic"], out=tmp_path)
    assert seen == first, "an arm was trained again instead of resumed"
    assert not (tmp_path / "checkpoints").exists()


def _declared_outputs(experiment: str) -> list[str]:
    """File names under ``outputs/EXPERIMENT/`` that dvc.yaml's stage lists as outs, metrics, plots."""
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][experiment]
    paths = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []):
            paths.append(item if isinstance(item, str) else next(iter(item)))
    prefix = f"outputs/{experiment}/"
    assert paths and all(p.startswith(prefix) for p in paths), paths
    return [p[len(prefix):] for p in paths]


def _plot_fields(experiment: str) -> dict[str, set[str]]:
    """For each plot of the stage: the CSV columns it draws (x, y, and the fields of its
    template's encoding other than DVC's own ``rev``)."""
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][experiment]
    out = {}
    for item in stage.get("plots", []):
        (path, props), = item.items()
        fields = {props["x"], props["y"]}
        template = json.loads((ROOT / props["template"]).read_text())
        for enc in template["encoding"].values():
            if isinstance(enc, dict) and not enc.get("field", "<").startswith("<"):
                fields.add(enc["field"])
        out[path.split("/", 2)[2]] = fields - {"rev"}
    assert out, f"stage {experiment} declares no plots"
    return out


def test_a_relative_data_root_is_made_absolute_for_the_kernel(tmp_path, monkeypatch):
    """The kernel runs in notebooks/: a relative $DEQLIB_DATA must keep naming the folder it
    names where the command was typed, and be restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, "mydata")
    with absolute_data_env():
        assert os.environ[DATA_ENV] == str(tmp_path / "mydata")
    assert os.environ[DATA_ENV] == "mydata"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "abs"))
    with absolute_data_env():
        assert os.environ[DATA_ENV] == str(tmp_path / "abs")
    monkeypatch.delenv(DATA_ENV)
    with absolute_data_env():
        assert DATA_ENV not in os.environ


def test_refresh_gives_the_kernel_an_absolute_data_env(tmp_path, monkeypatch):
    """pipelines.refresh runs the kernel in the notebook's folder too: the same rule; and on the
    pinned numeric path, as nbval does in the tests."""
    import nbclient

    from pipelines.refresh import refresh

    seen = {}

    class Client:  # stands in for the kernel: what would its environment hold?
        def __init__(self, nb, **kwargs):
            pass

        def execute(self):
            seen["data"] = os.environ.get(DATA_ENV)
            seen["numerics"] = {k: os.environ.get(k) for k in PINNED_ENV}

    monkeypatch.setattr(nbclient, "NotebookClient", Client)
    (tmp_path / "nb").mkdir()
    source = tmp_path / "nb" / "x.py"
    source.write_text("# %%\n1 + 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, "mydata")
    assert refresh(source) == source.with_suffix(".ipynb") and source.with_suffix(".ipynb").exists()
    assert seen["data"] == str(tmp_path / "mydata") and os.environ[DATA_ENV] == "mydata"
    assert seen["numerics"] == PINNED_ENV, "the kernel must start on the pinned numeric path"


def test_runner_rejects_a_bad_override(tmp_path):
    with pytest.raises(Exception, match="max_step"):
        run("synthetic", profile="small", overrides={"train.max_step": 3}, out=tmp_path)
    assert not (tmp_path / "notebook.ipynb").exists()  # nothing half-written


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb")))
def test_committed_notebook_outputs_reproduce(notebook, numeric_path, cell_timeout):
    """nbval re-runs the notebook on the pinned numeric path and compares every output not
    marked NBVAL_IGNORE_OUTPUT, bit for bit. Where the pinned path cannot hold (no AVX2, not
    x86-64) or ``$DEQLIB_NOTEBOOK_RTOL`` is set, ``pipelines.nbcheck`` compares at that relative
    tolerance instead (README, "Reproducing the notebooks")."""
    skip_without_slice(_small_data_root(notebook))
    rtol = os.environ.get(RTOL_ENV) or ("" if numeric_path["pinned"] else DEFAULT_RTOL)
    if rtol:
        cmd = [sys.executable, "-m", "pipelines.nbcheck", f"--rtol={rtol}", f"--timeout={cell_timeout}",
               str(ROOT / "notebooks" / notebook)]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
               f"--nbval-cell-timeout={cell_timeout}", str(ROOT / "notebooks" / notebook)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=pinned_environ())
    how = (f"compared at rtol={rtol}" if rtol else "compared bit for bit by nbval") + \
        f" on numeric path {numeric_path}, {cell_timeout} s per cell"
    assert proc.returncode == 0, f"{notebook} ({how}):\n" + _failure_summary(proc.stdout) + \
        proc.stdout[-6000:] + proc.stderr[-2000:]


def _failure_summary(stdout: str) -> str:
    """The failing cells and any timeout, from nbval's report, before its long diff."""
    keep = [ln for ln in stdout.splitlines() if ln.startswith(("FAILED", "ERROR")) or "Timeout" in ln
            or ln.startswith("  code cell")]
    return "\n".join(keep[:20]) + ("\n\n" if keep else "")


def _small_data_root(notebook: str) -> str:
    """The data root of the notebook's experiment in the small profile ("" if it has none)."""
    experiment = next(e for e, src in NOTEBOOKS.items() if Path(src).stem == Path(notebook).stem)
    small = load_params(ROOT / "params.yaml")[experiment]["small"]
    return small.get("data", {}).get("root", "")


def test_every_source_is_paired():
    for src in (ROOT / "notebooks").glob("[0-9]*.py"):
        assert src.with_suffix(".ipynb").exists(), f"{src.name} has no paired .ipynb"


def test_dvc_accepts_the_pipeline():
    """dvc.yaml parses, and every notebook has a stage that depends on its source."""
    import shutil

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    proc = subprocess.run([dvc, "dag", "--md"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for experiment in NOTEBOOKS:
        assert experiment in proc.stdout
