"""One training loop for every experiment, on Accelerate.

A model plugs in by returning a :class:`StepOutput` from ``model(batch, pretrain=bool)``: the
task loss, the :class:`~deqlib.deq.DEQStats` of its equilibrium solve (None while pretraining
an explicit weight-tied stack) and any extra scalars to log. The loop adds the Jacobian
penalty, steps the optimizer and the cosine schedule, clips gradients, records per-step
statistics and writes checkpoints atomically.

Determinism and exact resume: every random draw of step ``t`` (data order, dropout, the
Bernoulli draw of the penalty and its probes) comes from generators seeded by ``(seed, t)``
or ``(seed, epoch)``, so a run resumed from a checkpoint at step ``k`` is bit-for-bit the
uninterrupted run on CPU.

Per-process state: what a module keeps between steps through ``get_extra_state`` (the
DEQ-Transformer's segment memory) differs between processes, and the model checkpoint is
written by the main process alone. With more than one process, each also writes its own
``checkpoint.rank<r>.pt`` beside it, and on resume loads it when it is of the same step and
world size (else it warns, and the model's own checks start that state afresh).

Which run a checkpoint belongs to: it records the training config, the step count and the
caller's ``identity`` (the experiment's whole config); a checkpoint that differs in any of them
is not resumed from (a warning names the keys) and the run starts afresh. The pipeline's runner
asks the notebooks' runs to checkpoint under ``$DEQLIB_RUN_DIR`` (:func:`pipeline_run_dir`), so
that a killed ``dvc repro`` resumes each arm where it stopped.

Checkpoints are loaded with ``torch.load(weights_only=True)``: a file planted where a checkpoint
goes could otherwise run code when unpickled, before its run identity is even compared. So a
checkpoint holds tensors and plain values only (the run identity is converted on save), and one
that cannot be read (foreign, empty, cut short) is warned about, naming it, and not resumed from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .atomic import atomic_open, leftover_temporaries
from .checks import check_choice, check_int, check_real
from .deq import DEQStats, SolverSettings
from .jacobian import JacobianPenalty

__all__ = ["TrainConfig", "StepOutput", "TensorBatches", "train", "TrainResult", "atomic_save", "evaluate",
           "make_accelerator", "pipeline_run_dir", "RUN_DIR_ENV", "equilibrium_mean", "checkpoint_files",
           "remove_pipeline_checkpoints"]

RUN_DIR_ENV = "DEQLIB_RUN_DIR"
# In $DEQLIB_RUN_DIR: one line per arm folder pipeline_run_dir handed out, so that the runner
# removes what the run's arms wrote there and nothing else.
ARMS_FILE = ".arms"
CHECKPOINT = "checkpoint.pt"
_RANK_FILE = re.compile(r"checkpoint\.rank\d+\.pt")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization, solver thresholds and the Jacobian penalty (Table 4's rows).

    ``max_steps`` caps the run below ``epochs`` (a step-limit override for smoke runs).
    ``forward`` / ``backward`` are the solver settings (``max_iter`` is the NFE threshold).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    pretrain_steps: int = 0
    seed: int = 0
    mixed_precision: str = "no"
    checkpoint_every: int = 0
    forward: SolverSettings = field(default_factory=lambda: SolverSettings(max_iter=30, tol=1e-3))
    backward: SolverSettings = field(default_factory=lambda: SolverSettings(max_iter=30, tol=1e-4))
    jacobian: JacobianPenalty = field(default_factory=JacobianPenalty)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "pretrain_steps", "seed", "checkpoint_every"):
            check_int(name, getattr(self, name), 0)
        check_int("max_steps", self.max_steps, 1, optional=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_real("lr", self.lr, minimum=0, min_open=True)
        check_real("weight_decay", self.weight_decay, minimum=0)
        check_real("momentum", self.momentum, minimum=0, maximum=1, max_open=True)
        check_real("grad_clip", self.grad_clip, minimum=0, min_open=True, optional=True)  # null: no clipping


@dataclass
class StepOutput:
    """What ``model(batch, pretrain=...)`` returns to the loop."""

    loss: Tensor
    stats: DEQStats | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class TensorBatches:
    """Shuffled mini-batches of aligned tensors, reproducible from ``(seed, epoch)``.

    ``tensors``: each ``(N, ...)``. ``batch(epoch, i, rank, world)`` is the ``i``-th batch of
    ``epoch``, this process's share of it. ``transform(batch, generator)`` may augment.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        batch_size: int,
        seed: int = 0,
        transform: Callable[[tuple[Tensor, ...], torch.Generator], tuple[Tensor, ...]] | None = None,
    ):
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"tensors differ in length: {[t.shape[0] for t in tensors]}")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} examples")
        self.tensors, self.batch_size, self.seed, self.transform = tuple(tensors), batch_size, seed, transform
        self.steps_per_epoch = n // batch_size  # drop the ragged last batch

    def batch(self, epoch: int, i: int, rank: int = 0, world: int = 1) -> tuple[Tensor, ...]:
        perm = torch.randperm(self.tensors[0].shape[0], generator=_gen(self.seed, epoch))
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
        out = tuple(t[idx] for t in self.tensors)
        if self.transform is not None:
            # The whole global batch, then this process's share: each example gets its own
            # draw (not the one its position in every share gets), whatever the process count.
            out = self.transform(out, _gen(self.seed, epoch, i, 1))
        return tuple(t[rank::world] for t in out)


def _gen(*key: int) -> torch.Generator:
    """A generator seeded by a tuple of ints (stable across runs and processes)."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _rank_gen(seed: int, step: int, stream: int, rank: int) -> torch.Generator:
    """The generator of one random stream of a step on process ``rank``: each process its own
    (dropout masks and probes must differ between the processes' shares of a batch), process 0
    the one a single-process run draws."""
    return _gen(seed, step, stream) if rank == 0 else _gen(seed, step, stream, rank)


def equilibrium_mean(records: Sequence[Mapping[str, Any]], key: str) -> float:
    """Mean of ``key`` over the equilibrium (not pretraining) steps of ``records``, NaN values
    (a step with no solve to report) left out; NaN when none is left."""
    vals = [r[key] for r in records if not r["pretrain"] and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else float("nan")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`deqlib.atomic.atomic_open`: a kill mid-save leaves the
    previous checkpoint, never a part of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def _plain(obj: Any, where: str) -> Any:
    """``obj`` as the values ``torch.load(weights_only=True)`` reads back (dicts, lists, tuples,
    strings, numbers, None, tensors): a path becomes its string, a NumPy number its Python
    number. Anything else raises ValueError naming its key (``where``), before any training."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):  # a named tuple too: its class is not loadable
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    raise ValueError(f"a checkpoint holds plain values only: {where}={obj!r} (a {type(obj).__name__}) "
                     "cannot be saved; give a string or number in its place")


def _read_checkpoint(path: Path, consequence: str) -> Any:
    """``torch.load(path, weights_only=True)``, or None with a warning naming ``path`` when it
    cannot be read: a file that would run code when unpickled, or one cut short or emptied (a
    full disk, an interrupted copy). Such a file must not stop every later run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the file holds, the run goes on without it
        first = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"cannot read the checkpoint {path} ({type(err).__name__}: {first}); {consequence}",
                      stacklevel=3)
        return None


def make_accelerator(cfg: TrainConfig) -> Any:
    """The ``accelerate.Accelerator`` that :func:`train` uses by default: the GPU when there is
    one, ``cfg.mixed_precision``, and as many processes as the launcher (``accelerate launch``,
    ``torchrun``) started.

    DistributedDataParallel is told that some parameters may go unused in a step: the adaptive
    softmax computes a tail cluster only for batches with a target in it, and without this the
    first step after one that missed a cluster stops every process with an error.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _extra_states(model: nn.Module) -> dict[str, Any]:
    """The ``..._extra_state`` entries of ``model.state_dict()`` (what modules keep through
    ``get_extra_state``)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}


def _rank_path(ckpt_path: Path, rank: int) -> Path:
    return ckpt_path.with_name(f"{ckpt_path.stem}.rank{rank}{ckpt_path.suffix}")


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The files :func:`train` has written in ``run_dir`` (its checkpoint, the per-process
    files, temporaries a killed save left), sorted; what else the folder holds is not listed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    ours = [p for p in run_dir.iterdir() if p.name == CHECKPOINT or _RANK_FILE.fullmatch(p.name)]
    ours += [t for p in [run_dir / CHECKPOINT, *ours] for t in leftover_temporaries(p)]
    return sorted(set(ours))


def _load_rank_state(model: nn.Module, path: Path, step: int, world: int) -> None:
    """Give each module its own process's extra state from ``path``, if it matches the run."""
    state = None
    if path.exists():
        state = _read_checkpoint(path, "this process resumes with the main process's state")
        if state is None:
            return
    if not (isinstance(state, dict) and {"step", "world", "extra"} <= set(state)):
        state = None
    if state is None or state["step"] != step or state["world"] != world:
        found = "none" if state is None else f"step {state['step']} of a {state['world']}-process run"
        warnings.warn(f"no per-process state for step {step} of this {world}-process run at {path} "
                      f"(found {found}); this process resumes with the main process's")
        return
    model.load_state_dict(state["extra"], strict=False)  # only these keys: set_extra_state


def pipeline_run_dir(name: str) -> Path | None:
    """``$DEQLIB_RUN_DIR/<name>`` (``name`` made a safe folder name), where ``pipelines.run``
    asks a notebook's training runs to checkpoint; None when the variable is unset (a plain
    notebook, nbval): no checkpoints. The folder is noted in ``$DEQLIB_RUN_DIR/.arms``, so that
    :func:`remove_pipeline_checkpoints` removes what the arms wrote there and nothing else."""
    root = os.environ.get(RUN_DIR_ENV, "")
    if not root:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    if safe.strip(".") == "":  # "", "." and ".." name no folder of their own
        safe = "run"
    folder = Path(root) / safe
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ARMS_FILE, "a") as fh:  # one short append: whole lines
        fh.write(safe + "\n")
    return folder


def remove_pipeline_checkpoints(root: str | Path) -> None:
    """Remove what the training arms of a pipeline run wrote under ``root`` (its
    ``$DEQLIB_RUN_DIR``): the :func:`checkpoint_files` of each arm folder that
    :func:`pipeline_run_dir` handed out, the list of them, and the folders that leaves empty.
    Anything else there (a file of the user's) is kept, and so is its folder."""
    root = Path(root)
    arms_file = root / ARMS_FILE
    try:
        names = set(arms_file.read_text().split())
    except FileNotFoundError:
        names = set()
    for name in sorted(names):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.strip(".") == "":
            continue  # not a name pipeline_run_dir writes (a line cut short cannot climb out)
        folder = root / name
        for path in checkpoint_files(folder):
            path.unlink(missing_ok=True)
        _remove_if_empty(folder)
    arms_file.unlink(missing_ok=True)
    _remove_if_empty(root)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or not there
        pass


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys at which two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(all)"]


@dataclass
class TrainResult:
    records: list[dict[str, float]]
    steps: int
    resumed_from: int


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        # Fused: the unfused CPU step takes ``torch.sqrt``, which MKL's vector math computes
        # differently on different CPUs (its bits are not pinned, see deqlib.numerics); the
        # fused kernel is ATen's own.
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _mean(t: Tensor | None) -> float:
    return float("nan") if t is None else float(t.float().mean())


def train(
    model: nn.Module,
    data: TensorBatches,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    accelerator: Any = None,
    identity: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``cfg``; resume from ``run_dir/checkpoint.pt`` if there
    and it is of the same run (same ``cfg``, step count and ``identity``; else start afresh).

    Args:
        run_dir: where checkpoints go (None: no checkpoints).
        identity: what else makes the run this one (e.g. the experiment's whole config, the
            model's shape included); compared, with ``cfg``, before resuming.
        stop_after: stop (after checkpointing) once this many steps are done, as if killed;
            used to test exact resume.
        accelerator: an ``accelerate.Accelerator``; :func:`make_accelerator` makes one if None.
    Returns:
        The per-step records (of the whole run, resumed part included).
    """
    if accelerator is None:
        accelerator = make_accelerator(cfg)
    total = cfg.epochs * data.steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer = _make_optimizer(model, cfg)
    scaler = getattr(accelerator, "scaler", None)  # fp16: the loss scale and its growth count
    ckpt_path = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    start, records = 0, []
    run_id = _plain({"train": dataclasses.asdict(cfg), "total_steps": total, "steps_per_epoch": data.steps_per_epoch,
                     "identity": dict(identity or {})}, "run")
    state = None
    if ckpt_path is not None and ckpt_path.exists():
        state = _read_checkpoint(ckpt_path, "not resuming from it: this run starts afresh and overwrites it")
        if state is not None and not isinstance(state, dict):
            state = {}
        if state is not None and state.get("run") != run_id:
            keys = _differing_keys(state.get("run") or {}, run_id)
            warnings.warn(f"{ckpt_path} is a checkpoint of another run (it differs in {keys[:8]}); "
                          "not resuming from it: this run starts afresh and overwrites it", stacklevel=2)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, records = state["step"], state["records"]
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if accelerator.num_processes > 1:
            _load_rank_state(model, _rank_path(ckpt_path, accelerator.process_index), start,
                             accelerator.num_processes)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm import tqdm

        # The plain text bar: tqdm.auto's notebook bar needs ipywidgets, and without them it
        # prints a warning naming the environment's path into the notebook. A slow refresh:
        # in a notebook every refresh is a stored output.
        bar = tqdm(total=total, initial=start, desc="train", leave=False, mininterval=5.0, maxinterval=60.0)

    step = start
    for step in range(start, total):
        if stop_after is not None and step >= stop_after:
            break
        t0 = time.perf_counter()
        epoch, i = divmod(step, data.steps_per_epoch)
        rank = accelerator.process_index
        torch.manual_seed(_rank_gen(cfg.seed, step, 2, rank).initial_seed())  # dropout etc. of this step
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total, cfg.warmup_steps, cfg.schedule)
        batch = tuple(t.to(accelerator.device) for t in data.batch(epoch, i, rank, accelerator.num_processes))
        wrapped.train()
        pretrain = step < cfg.pretrain_steps
        with accelerator.autocast():
            out: StepOutput = wrapped(batch, pretrain=pretrain)
            loss = out.loss
            jac_est = None
            gen = _gen(cfg.seed, step, 3)  # the same draw of tau on every process
            if out.stats is not None and cfg.jacobian.applies(gen):
                if rank:
                    gen = _rank_gen(cfg.seed, step, 3, rank)  # but this process's own probes
                z_star, f_star = out.stats.jacobian_inputs()
                # gamma's schedule runs over the equilibrium steps: it starts at gamma when the
                # penalty first can apply, after pretraining (as the official code's does).
                jr, jac_est = cfg.jacobian.loss(z_star, f_star, step - cfg.pretrain_steps,
                                                total - cfg.pretrain_steps, gen)
                loss = loss + jr
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip is not None:
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
        optimizer.step()
        st = out.stats
        rec = {
            "step": step,
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": float(out.loss.detach()),
            "pretrain": float(pretrain),
            "fwd_nfe": float(st.forward.nfe) if st else float("nan"),
            "fwd_rel_res": _mean(st.forward.rel_residual) if st else float("nan"),
            "bwd_nfe": float(st.backward.nfe) if st and st.backward else float("nan"),
            "bwd_rel_res": _mean(st.backward.rel_residual) if st and st.backward else float("nan"),
            "jac_fro": math.sqrt(float(jac_est)) if jac_est is not None else float("nan"),
            "step_time_s": time.perf_counter() - t0,
            **out.metrics,
        }
        records.append(rec)
        done = step + 1
        if ckpt_path is not None and (
            (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total
            or done == stop_after
        ):
            unwrapped = accelerator.unwrap_model(wrapped)
            if accelerator.num_processes > 1:
                atomic_save({"step": done, "world": accelerator.num_processes,
                             "extra": _extra_states(unwrapped)},
                            _rank_path(ckpt_path, accelerator.process_index))
            if accelerator.is_main_process:
                atomic_save({"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None,
                             "step": done, "records": records, "run": run_id}, ckpt_path)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3g}", nfe=f"{rec['fwd_nfe']:.0f}/{rec['bwd_nfe']:.0f}",
                            refresh=False)
    if bar is not None:
        bar.close()
    accelerator.wait_for_everyone()
    return TrainResult(records=records, steps=len(records), resumed_from=start)


def evaluate(
    fn: Callable[[int, int], Mapping[str, Tensor | float]],
    n_items: int,
    batch_size: int,
    accelerator: Any = None,
) -> dict[str, float]:
    """Sum per-batch statistics over ``range(n_items)``, split across processes.

    The items are cut into the contiguous batches ``[start, stop)`` of ``batch_size`` (the last
    one shorter, never padded); process ``r`` of ``w`` takes batches ``r, r + w, ...``. ``fn(start,
    stop)`` returns sums over its batch (e.g. ``{"correct": 37, "n": 64}``, numbers or 0-d
    tensors); the totals are added up over every process, so each item counts exactly once.

    Args:
        accelerator: an ``accelerate.Accelerator`` (None: this process does every batch).
    Returns:
        The totals, the same on every process.
    """
    check_int("n_items", n_items, 1)
    check_int("batch_size", batch_size, 1)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    totals: dict[str, float] = {}
    for b in range(rank, math.ceil(n_items / batch_size), world):
        start = b * batch_size
        for key, value in fn(start, min(n_items, start + batch_size)).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if world > 1:
        from accelerate.utils import gather_object

        # Objects, not tensors: a process may have had no batch and so no keys.
        merged: dict[str, float] = {}
        for part in gather_object([totals]):
            for key, value in part.items():
                merged[key] = merged.get(key, 0.0) + value
        totals = merged
    return totals
