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
    "synthetic": {"train.max_steps": 3, "data.n_train": 256, "data.n_valid": 64, "eval.nfe_cap": 20,
                  "eval.plain_cap": 50},
    "cifar10": {"data.root": "../shared/data/cifar-10-subset", "data.download": False, "data.n_test": 8,
                "train.max_steps": 2, "train.batch_size": 4, "train.pretrain_steps": 1, "eval.batch_size": 8,
                "eval.nfe": [1, 2], "eval.compare_nfe": 2, "eval.nfe_cap": 4, "eval.plain_cap": 4,
                "eval.jac_batch": 2, "eval.radius_iters": 5, "eval.radius_vectors": 2, "eval.memory_batch": 2,
                "eval.monitor_every": 1, "arms.gammas": [0.0, 0.5], "seeds": [0]},
    # The shared ImageNet slice, 2 images per class (20 / 20), at the paper's 224 px and model
    # (its 10 classes for the 1,000-way head); 2 steps, 1 of pretraining; the caps cut short.
    "imagenet": {"data.root": "../shared/data", "data.folder": "imagenette-slice", "data.max_per_class": 2,
                 "data.workers": 0, "model.num_classes": 10, "train.max_steps": 2, "train.batch_size": 4,
                 "train.pretrain_steps": 1, "eval.batch_size": 10, "eval.nfe": [1, 2], "eval.compare_nfe": 2,
                 "eval.nfe_cap": 3, "eval.plain_cap": 3, "eval.jac_batch": 2, "eval.radius_iters": 3,
                 "eval.radius_vectors": 2, "eval.memory_batch": 2, "eval.monitor_every": 1},
    "solvers": {"synthetic.batch": 64, "conv.batch": 2, "conv.channels": 16, "conv.size": 8,
                "conv.groups": 4, "hard_nfe": [50, 80], "repeats": 1, "radius_iters": 10,
                "mdeq.batch": 2, "mdeq.channels": [16, 32], "mdeq.expansion": 2, "mdeq.image_size": 16,
                "mdeq.downsample": 1, "transformer.batch": 2, "transformer.d_model": 32, "transformer.n_head": 2,
                "transformer.d_head": 16, "transformer.d_inner": 64, "transformer.tgt_len": 8,
                "transformer.mem_len": 8, "contract_steps": 30,
                # the trained maps: the WikiText-2 slice and notebook 02's smoke-size layer, 2 seeds
                "trained.data.root": "../shared/data/wikitext-2", "trained.data.folder": "",
                "trained.data.train_file": "valid.txt", "trained.data.eval_file": "test.txt",
                "trained.data.download": False, "trained.model.d_model": 32, "trained.model.n_head": 2,
                "trained.model.d_head": 16, "trained.model.d_inner": 64, "trained.model.tgt_len": 16,
                "trained.model.mem_len": 16, "trained.model.cutoffs": [2000, 8000], "trained.train.max_steps": 3,
                "trained.train.batch_size": 4, "trained.train.pretrain_steps": 1, "trained.seeds": [0, 1],
                "trained.eval.max_tokens": 2000, "trained.eval.monitor_every": 2, "trained.eval.monitor_batch": 2,
                "trained.eval.radius_iters": 10, "trained.eval.radius_vectors": 2},
    # WikiText-103 (and its 267K vocabulary) is not here: the WikiText-2 slice stands in, and the
    # 98M-parameter model shrinks to what a CPU trains for 3 steps (cutoffs inside the slice's
    # 13,777 words, an 18 -> 2 layer explicit stack, 2,000 evaluation tokens), one seed, the
    # monitor's subspace iteration cut short; the arms keep the paper's thresholds.
    "wikitext": {"train.max_steps": 3, "train.batch_size": 4, "train.pretrain_steps": 1,
                 "data.root": "../shared/data/wikitext-2", "data.folder": "", "data.train_file": "valid.txt",
                 "data.eval_file": "test.txt", "data.download": False,
                 "model.d_model": 32, "model.n_head": 2, "model.d_head": 16, "model.d_inner": 64,
                 "model.tgt_len": 16, "model.mem_len": 16, "model.cutoffs": [2000, 8000], "model.n_layer": 2,
                 "eval.max_tokens": 2000, "eval.nfe_caps": [2, 4], "eval.batch_size": 4, "eval.memory_batch": 2,
                 "eval.monitor_every": 2, "eval.radius_iters": 10, "eval.radius_vectors": 2,
                 "eval.plain_nfe_cap": 5, "seeds": [0]},
    # No data set; the paper-size models shrink to what a CPU measures in seconds (Table 5's rows
    # still run at the paper's NFE, 13 to 30).
    "memory": {"transformer.batch": 2, "transformer.d_model": 16, "transformer.n_head": 2, "transformer.d_head": 8,
               "transformer.d_inner": 32, "transformer.tgt_len": 6, "transformer.mem_len": 6, "transformer.vocab": 60,
               "transformer.cutoffs": [20, 40], "transformer.depth": 3, "transformer.time_nfe": [2, 4],
               "mdeq.batch": 2, "mdeq.channels": [8, 16], "mdeq.head_channels": [8, 16], "mdeq.final_channels": 16,
               "mdeq.image_size": 16, "mdeq.depth": 2, "mdeq.time_nfe": [2, 4], "eval.nfe": [2, 4],
               "eval.depths": [1, 2], "eval.repeats": 2},
    # Both models at notebook 02's / 03's smoke sizes on the WikiText-2 and CIFAR-10 slices (3
    # steps, 1 of pretraining for the Transformer), one seed, the monitor every step; the arms
    # keep the paper profile's doses, thresholds and penalties.
    "weight_decay": {
        "transformer.data.root": "../shared/data/wikitext-2", "transformer.data.folder": "",
        "transformer.data.train_file": "valid.txt", "transformer.data.eval_file": "test.txt",
        "transformer.data.download": False, "transformer.model.d_model": 32, "transformer.model.n_head": 2,
        "transformer.model.d_head": 16, "transformer.model.d_inner": 64, "transformer.model.tgt_len": 16,
        "transformer.model.mem_len": 16, "transformer.model.cutoffs": [2000, 8000], "transformer.model.n_layer": 2,
        "transformer.train.max_steps": 3, "transformer.train.batch_size": 4, "transformer.train.pretrain_steps": 1,
        "transformer.eval.max_eval": 2000, "transformer.eval.eval_batch": 4, "transformer.eval.monitor_every": 1,
        "transformer.eval.monitor_batch": 2, "transformer.eval.radius_iters": 5, "transformer.eval.radius_vectors": 2,
        "transformer.eval.plain_nfe_cap": 5,
        "mdeq.data.root": "../shared/data/cifar-10-subset", "mdeq.data.download": False, "mdeq.data.n_train": 16,
        "mdeq.data.n_test": 8, "mdeq.model.channels": [8, 16], "mdeq.model.head_channels": [8, 16],
        "mdeq.model.final_channels": 16, "mdeq.model.downsample": 1, "mdeq.train.max_steps": 3,
        "mdeq.train.batch_size": 4, "mdeq.eval.monitor_every": 1, "mdeq.eval.monitor_batch": 2,
        "mdeq.eval.radius_iters": 5, "mdeq.eval.radius_vectors": 2, "mdeq.eval.plain_nfe_cap": 5,
        "mdeq.eval.eval_batch": 8, "seeds": [0]},
}


def test_every_notebook_has_a_smoke_override():
    assert set(PAPER_SMOKE) == set(NOTEBOOKS)


@pytest.mark.parametrize("experiment", sorted(NOTEBOOKS))
def test_paper_profile_starts_and_trains_on_cpu(experiment, tmp_path):
    smoke = PAPER_SMOKE[experiment]
    for key, root in smoke.items():
        if key == "data.root" or key.endswith(".data.root"):
            skip_without_slice(root)
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

    real_remove = runner.remove_pipeline_checkpoints
    monkeypatch.setattr(runner, "remove_pipeline_checkpoints", lambda root: None)  # as if killed before cleanup
    run("synthetic", profile="paper", overrides=PAPER_SMOKE["synthetic"], out=tmp_path)
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("checkpoint.pt")}
    assert len(first) >= 2, first  # one per gamma arm
    seen = {}

    def remove(root):
        seen.update({p: p.stat().st_mtime_ns for p in Path(root).rglob("checkpoint.pt")})
        real_remove(root)

    monkeypatch.setattr(runner, "remove_pipeline_checkpoints", remove)
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
    for root in _small_data_roots(notebook):
        skip_without_slice(root)
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


def _small_data_roots(notebook: str) -> list[str]:
    """Every data root of the notebook's experiment in the small profile, at any depth (an
    experiment of two models has one per model)."""
    experiment = next(e for e, src in NOTEBOOKS.items() if Path(src).stem == Path(notebook).stem)

    def roots(section) -> list[str]:
        if not isinstance(section, dict):
            return []
        found = [section["root"]] if isinstance(section.get("root"), str) else []
        return found + [r for value in section.values() for r in roots(value)]

    return roots(load_params(ROOT / "params.yaml")[experiment]["small"])


def test_every_source_is_paired():
    for src in (ROOT / "notebooks").glob("[0-9]*.py"):
        assert src.with_suffix(".ipynb").exists(), f"{src.name} has no paired .ipynb"


def test_dvc_accepts_the_pipeline():
    """dvc.yaml parses, every notebook has a stage, and the stages of the experiments that read
    a downloadable data set come after the stage that fetches it."""
    import re
    import shutil

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    proc = subprocess.run([dvc, "dag", "--dot"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    nodes = set(re.findall(r'^"(\w+)";$', proc.stdout, re.M))
    edges = set(re.findall(r'^"(\w+)" -> "(\w+)";$', proc.stdout, re.M))
    assert set(NOTEBOOKS) <= nodes, proc.stdout
    assert {("fetch_cifar10", "cifar10"), ("fetch_wikitext103", "wikitext")} <= edges, proc.stdout


# --- the runner around the notebook: checked before a kernel starts, one run per folder, the
# output folder changed only by a run that finished, only the run's checkpoints removed. A fake
# papermill stands in for the kernel where the notebook's work is beside the point.

def _fake_notebook(monkeypatch, write=None, fail=None):
    """Replace papermill's execution with a function that writes ``write`` (name -> text) into
    the notebook's ``output_dir``, trains the given arms (checkpoints through the real
    ``pipeline_run_dir`` and ``atomic_save``), then raises ``fail`` if given."""
    import papermill

    from deqlib.experiments.core import pipeline_run_dir
    from deqlib.train import atomic_save

    calls = []

    def execute_notebook(input_path, output_path, parameters=None, **kwargs):
        calls.append(parameters)
        out = Path(parameters["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        for arm in ("gamma_0", "gamma_1"):
            atomic_save({"step": 1}, pipeline_run_dir(arm) / "checkpoint.pt")
        for name, text in (write or {}).items():
            (out / name).write_text(text)
        Path(output_path).write_text(Path(input_path).read_text())
        if fail is not None:
            raise fail

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    return calls


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_run_leaves_the_output_folder_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "metrics.json").write_text('{"old": 1}\n')
    (tmp_path / "training_curves.png").write_text("old figure")
    before = _tree(tmp_path)
    _fake_notebook(monkeypatch, {"metrics.json": '{"new": 2}\n', "training_curves.png": "new figure",
                                 "fig9_target.png": "new"}, fail=RuntimeError("cell 7 failed"))
    with pytest.raises(RuntimeError, match="cell 7 failed"):
        run("synthetic", profile="small", out=tmp_path)
    after = _tree(tmp_path)
    kept = {k: v for k, v in after.items() if not k.startswith("checkpoints/")}
    assert kept == before, "a failed run changed the output folder"
    # the arms' checkpoints stay where they are, for the next run to resume
    assert sorted(k for k in after if k.startswith("checkpoints/")) == [
        "checkpoints/.arms", "checkpoints/gamma_0/checkpoint.pt", "checkpoints/gamma_1/checkpoint.pt"]


def test_a_finished_run_publishes_its_files_and_clears_what_a_killed_run_left(tmp_path, monkeypatch):
    (tmp_path / "metrics.json").write_text('{"old": 1}\n')
    (tmp_path / "keep.txt").write_text("not the run's")
    from pipelines.run import STAGING

    (tmp_path / STAGING).mkdir()
    (tmp_path / STAGING / "stale.png").write_text("from a killed run")
    calls = _fake_notebook(monkeypatch, {"metrics.json": '{"loss": 0.5}\n', "curves.csv": "step\n0\n"})
    nb = run("synthetic", profile="small", out=tmp_path)
    assert nb == tmp_path / "notebook.ipynb" and nb.exists()
    assert calls[0]["output_dir"] != str(tmp_path), "the notebook must write into a staging folder"
    assert sorted(_tree(tmp_path)) == ["curves.csv", "keep.txt", "metrics.json", "notebook.ipynb"]
    assert (tmp_path / "metrics.json").read_text() == '{"loss": 0.5}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.csv", "keep.txt", "metrics.json",
                                                          "notebook.ipynb"], "staging, lock or checkpoints left"


def test_a_finished_run_removes_only_the_checkpoints_its_arms_wrote(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "my_model.pt").write_text("x")
    _fake_notebook(monkeypatch, {"metrics.json": '{"loss": 0.5}\n'})
    run("synthetic", profile="small", out=tmp_path)
    assert _tree(tmp_path / "checkpoints") == {"my_model.pt": b"x"}, "a file the run did not write was removed"


def test_a_run_whose_metrics_hold_no_finite_number_fails_in_one_line(tmp_path, monkeypatch, capsys):
    """Every arm diverged: each metric is NaN, written as null. The run must not look done."""
    from pipelines.run import main

    (tmp_path / "metrics.json").write_text('{"gamma_0": {"loss": 0.4}}\n')
    _fake_notebook(monkeypatch, {"metrics.json": '{"gamma_0": {"loss": null, "nfe": null}, "gamma_1": {}}\n'})
    status = main(["synthetic", "--profile", "small", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status != 0
    assert err.count("\n") == 1 and "no finite number" in err and "metrics.json" in err, err
    assert (tmp_path / "metrics.json").read_text() == '{"gamma_0": {"loss": 0.4}}\n'


def test_a_second_run_into_the_same_folder_refuses_at_once(tmp_path, monkeypatch, capsys):
    import fcntl

    from pipelines.run import LOCK, main

    calls = _fake_notebook(monkeypatch, {"metrics.json": '{"loss": 0.5}\n'})
    with open(tmp_path / LOCK, "w") as held:  # what the first run holds while it runs
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status = main(["synthetic", "--profile", "small", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status != 0 and not calls, "the second run started a notebook"
    assert err.count("\n") == 1 and str(tmp_path) in err and str(tmp_path / LOCK) in err, err
    # released (the holder's process ended, or here closed the file): the lock file it left
    # does not stop the next run, and that run leaves none behind
    assert main(["synthetic", "--profile", "small", "--out", str(tmp_path)]) == 0 and len(calls) == 1
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("args, named", [
    (["--set", "train.max_step=3"], "max_step"),
    (["--set", "train.lr=-1"], "lr=-1"),
    (["--set", "gammas=oops"], "gammas"),
])
def test_a_config_error_is_one_line_before_any_kernel_starts(tmp_path, args, named):
    """No kernel start, no papermill traceback: the message alone, exit status 2, and the
    output folder untouched."""
    import time

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "synthetic", "--profile", "small",
                           "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m pipelines.run") and named in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _tree(out) == {"metrics.json": b"{}\n"}
    assert elapsed < 60, elapsed


def test_runs_start_kernels_over_ipc_without_the_tcp_warning(tmp_path, capfd):
    """ipykernel warns that a TCP kernel's traffic is plain text (another local user can reach
    the port); the kernels the pipeline starts listen on IPC sockets in a private folder."""
    import nbformat

    from pipelines.nbcheck import check_notebook
    from pipelines.refresh import refresh

    probe = ("from ipykernel.kernelapp import IPKernelApp\n"
             "import os\n"
             "app = IPKernelApp.instance()\n"
             "print(app.transport, oct(os.stat(os.path.dirname(app.connection_file)).st_mode & 0o777))")
    source = tmp_path / "probe.py"
    source.write_text("# %%\n" + probe + "\n")
    nb = nbformat.read(refresh(source), as_version=4)
    assert nb.cells[0].outputs[0]["text"].split() == ["ipc", "0o700"]
    report = check_notebook(source.with_suffix(".ipynb"), rtol=0.0, atol=0.0, timeout=60)
    assert [c.status for c in report.cells] == ["identical"], report.summary(0.0, 0.0)
    captured = capfd.readouterr()
    assert "without encryption" not in captured.out + captured.err


def test_a_pipeline_run_over_ipc_keeps_the_user_s_files(tmp_path):
    """The command as typed: no TCP warning from the kernel, the arms' checkpoints removed and
    a file of the user's under checkpoints/ kept."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "my_model.pt").write_text("x")
    sets = [a for k, v in PAPER_SMOKE["synthetic"].items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "synthetic", "--profile", "paper", *sets,
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "without encryption" not in proc.stdout + proc.stderr
    assert _tree(tmp_path / "checkpoints") == {"my_model.pt": b"x"}
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "notebook.ipynb").exists()
