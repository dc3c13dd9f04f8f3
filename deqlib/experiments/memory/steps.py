"""One training step of the DEQ-Transformer and of the MDEQ, in every way notebook 05
differentiates them, and its measurement: the one harness behind notebook 05 and
``python -m deqlib.bench transformer``.

A step is what the training loop does between two optimizer updates: the forward pass (an
equilibrium solve, or an explicit stack of layers), the loss, plus the Jacobian penalty when
the step draws it (added by :func:`deqlib.step.add_penalty`, as the loop adds it), and the
backward pass. The optimizer's update is left out: it is the same for every method, and its
state exists before the step.

Two kinds of step:

- the *whole* step: the model's own training step, embedding, injection and (adaptive) softmax
  or stem and classification head included;
- the *layer* step (``core=True``): the layers alone, the paper's "excluding embeddings". The
  injection is a fixed random input that receives its gradient, and the loss a fixed random
  linear readout of the output state, ``mean(w * z)``: everything the equilibrium layer (or
  the stack) and its solvers hold, and nothing of the embedding or the softmax.

How a step is differentiated (``method``):

- ``"implicit"``, ``"phantom"``, ``"unrolled"``: the DEQ's backward modes (:mod:`deqlib.deq`)
  after a forward solve of exactly ``k`` calls of ``f`` (the effective depth); the implicit
  backward solve runs ``backward_nfe`` calls;
- ``"tied"``: the explicit weight-tied stack, the layer applied ``k`` times by backprop;
- ``"untied"``: ``k`` distinct layers (the explicit network the paper compares with).

Measured (:func:`measure_memory`, :func:`time_rounds`, :func:`solver_buffers`): the peak of
live tensor bytes over the step and the bytes saved for backward (both device-independent,
:func:`deqlib.measure.step_memory`), the CUDA allocator's peak on a GPU, the step time, and the
solvers' own buffers (the peak of each solve minus that of one call of its map).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ...deq import DEQ, SolverSettings
from ...jacobian import JacobianPenalty
from ...measure import PeakMemory, step_memory
from ...models.mdeq import MDEQ, MultiscaleMap
from ...nn import once_per_step
from ...models.transformer import DEQTransformerLM, Memory, TransformerLayer
from ...step import StepOutput, add_penalty
from .config import EXPLICIT, MODES, MDEQSpec, TransformerSpec

__all__ = ["METHODS", "StepFn", "BufferProbe", "TransformerSteps", "MDEQSteps", "measure_memory", "time_rounds",
           "solver_buffers", "pick_device"]

METHODS = (*MODES, *EXPLICIT)
StepFn = Callable[[], dict]  # one training step; returns {"fwd_nfe": int | None, "bwd_nfe": int | None}


def pick_device(requested: str = "cpu") -> torch.device:
    """``requested``, ``"auto"`` meaning CUDA when there is one."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r}, but torch sees no CUDA device here")
    return torch.device(requested)


@dataclass(frozen=True)
class BufferProbe(SolverSettings):
    """Solver settings that also record, for every solve they run, the solver's own memory:
    the peak of live bytes during the solve minus that of one call of its map alone (that call
    made just before, outside the solve). For a step of its own, not a timed one."""

    record: list = field(default_factory=list, compare=False, repr=False)

    def run(self, f, z0):
        with PeakMemory() as one:
            f(z0)
        with PeakMemory() as whole:
            result = super().run(f, z0)
        self.record.append(max(whole.peak - one.peak, 0))
        return result


class _Stack(nn.Module):
    """Distinct copies of a layer applied in turn: ``f_n(...f_1(z, x)..., x)``."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, z, x):
        for layer in self.layers:
            z = layer(z, x)
        return z


def _train_step(model: nn.Module, forward: Callable[[], StepOutput], penalty: JacobianPenalty | None, seed: int,
                before: Callable[[], None] | None = None) -> StepFn:
    """A step of ``model``: ``forward()``, the loss (+ the penalty term when ``penalty``, at its
    start weight), backward, the gradients dropped. ``before`` runs first (the DEQ module this
    step differentiates by is put in place).

    Torch's global generator is seeded with ``seed`` first, so that every call draws the same
    dropout masks and penalty probes: the solvers' per-sample bookkeeping (which sample stops or
    restarts when) follows the values, and with it, by some hundred bytes, the peak; a step
    measured twice then gives the same bytes twice."""

    def step() -> dict:
        if before is not None:
            before()
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        out = forward()
        loss = out.loss if penalty is None else add_penalty(out, penalty)[0]
        loss.backward()
        # The gradients are made and counted; dropped now, as an optimizer would have consumed
        # them, so that the models a run keeps do not hold a second copy of their parameters.
        model.zero_grad(set_to_none=True)
        stats = out.stats
        return {"fwd_nfe": stats.forward.nfe if stats is not None else None,
                "bwd_nfe": stats.backward.nfe if stats is not None and stats.backward is not None else None}

    return step


class _Steps(ABC):
    """What both models share: the DEQ differentiated by ``method`` with ``k`` forward calls,
    the explicit stacks, the solver probe. Subclasses make the models and run them, whole
    (``core=False``) or the layers alone (``core=True``, see the module docstring)."""

    forward_settings: SolverSettings
    backward_settings: SolverSettings
    phantom_steps: int = 5

    def __init__(self, seed: int, device: torch.device | str):
        self.seed, self.device = seed, torch.device(device)
        self._models: dict = {}

    # --- what a subclass provides --------------------------------------------------------
    @abstractmethod
    def _new_model(self, variant: str) -> nn.Module:
        """A new model of ``variant``, seeded by ``self.seed``, on ``self.device``."""

    @abstractmethod
    def _layer(self, model: nn.Module) -> nn.Module:
        """The model's layer ``f`` (the map its DEQ solves)."""

    @abstractmethod
    def _set_layer(self, model: nn.Module, layer: nn.Module) -> None:
        """Put ``layer`` in the place of the model's layer ``f``."""

    @abstractmethod
    def _forward(self, model: nn.Module, layers: int | None, core: bool) -> StepOutput:
        """The forward pass and loss: the equilibrium (``layers`` None) or ``layers`` applications
        of the model's layer; the whole model, or with ``core`` the layers alone."""

    @abstractmethod
    def state_bytes(self) -> int:
        """Bytes of one equilibrium state ``z`` (the unit the solvers' histories come in)."""

    # --- shared -------------------------------------------------------------------------------
    def model(self, variant: str = "default") -> nn.Module:
        """The model of ``variant`` (made once, from the seed: every method of one variant
        differentiates the same weights)."""
        if variant not in self._models:
            torch.manual_seed(self.seed)
            self._models[variant] = self._new_model(variant).to(self.device).train()
        return self._models[variant]

    def layer_param_bytes(self, method: str, k: int) -> int:
        """Bytes of the parameters of the layers a step of ``method`` at ``k`` uses (one layer
        but for the untied stack's ``k``)."""
        one = sum(p.numel() * p.element_size() for p in self._layer(self.model()).parameters())
        return one * (k if method == "untied" else 1)

    def deq(self, method: str, k: int, backward_nfe: int | None = None, variant: str = "default",
            forward: SolverSettings | None = None, backward: SolverSettings | None = None) -> DEQ:
        """The DEQ module of a step on ``variant``'s layer: ``k`` forward calls, ``backward_nfe``
        backward ones (default: the configured threshold), differentiated by ``method``;
        ``forward`` / ``backward`` replace the configured solvers (their ``max_iter`` is set)."""
        fwd = (forward or self.forward_settings).replace(max_iter=k)
        if method == "unrolled":  # the unrolled mode is plain iteration, whatever the configured solver
            fwd = fwd.replace(method="fixed_point", options={})
        bwd = (backward or self.backward_settings).replace(max_iter=backward_nfe or self.backward_settings.max_iter)
        return DEQ(self._layer(self.model(variant)), fwd, bwd, backward=method, phantom_steps=self.phantom_steps)

    def step(self, method: str, k: int = 1, backward_nfe: int | None = None, penalty: JacobianPenalty | None = None,
             variant: str = "default", core: bool = False) -> StepFn:
        """One training step of ``method`` (see the module docstring) at effective depth ``k``,
        the penalty added when given (DEQ methods only); the whole model's, or with ``core``
        the layers' alone."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got method={method!r}")
        if penalty is not None and method not in MODES:
            raise ValueError(f"the penalty needs an equilibrium solve; method={method!r} has none")
        if method in MODES:
            return self._deq_step(self.model(variant), self.deq(method, k, backward_nfe, variant), penalty, core)
        model = self.model(f"untied{k}" if method == "untied" else variant)
        layers = 1 if method == "untied" else k
        return _train_step(model, lambda: self._forward(model, layers, core), None, self.seed)

    def probe_step(self, k: int, backward_nfe: int, penalty: JacobianPenalty | None = None,
                   variant: str = "default", core: bool = True) -> tuple[StepFn, BufferProbe, BufferProbe]:
        """An implicit step whose forward and backward solvers record their own memory."""
        fwd = BufferProbe(**_settings_fields(self.forward_settings))
        bwd = BufferProbe(**_settings_fields(self.backward_settings))
        deq = self.deq("implicit", k, backward_nfe, variant, forward=fwd, backward=bwd)
        return self._deq_step(self.model(variant), deq, penalty, core), deq.forward_solver, deq.backward_solver

    def _deq_step(self, model: nn.Module, deq: DEQ, penalty: JacobianPenalty | None, core: bool) -> StepFn:
        def put() -> None:  # one model, many DEQ modules: this step's is put in place at each call
            model.deq = deq

        return _train_step(model, lambda: self._forward(model, None, core), penalty, self.seed, before=put)


def _settings_fields(s: SolverSettings) -> dict:
    return {"method": s.method, "max_iter": s.max_iter, "tol": s.tol, "stop_mode": s.stop_mode,
            "options": dict(s.options), "check_every": s.check_every}


class TransformerSteps(_Steps):
    """Steps of the DEQ-Transformer LM on one seeded batch: tokens ``(batch, tgt_len)`` over
    ``vocab`` words and a memory of ``mem_len`` past positions (random states, zero
    injections, as a segment in the middle of a stream has). The layer step's injection is
    ``(batch, tgt_len, 3 n_head d_head)`` and its readout ``(batch, tgt_len, d_model)``, both
    seeded. Variants: ``"default"`` (Post-LN), ``"pre_ln"``, ``"untiedK"`` (an explicit model
    of K distinct layers)."""

    def __init__(self, spec: TransformerSpec, seed: int = 0, device: torch.device | str = "cpu",
                 phantom_steps: int = 5):
        super().__init__(seed, device)
        self.spec, self.phantom_steps = spec, phantom_steps
        self.forward_settings, self.backward_settings = spec.forward, spec.backward
        cfg = spec.config()
        B, L, d, HD = spec.batch, cfg.tgt_len, cfg.d_model, cfg.n_head * cfg.d_head
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, spec.vocab, (B, L + 1), generator=g)
        self.inputs = tokens[:, :-1].contiguous().to(self.device)
        self.targets = tokens[:, 1:].contiguous().to(self.device)
        self.memory = None
        if cfg.mem_len:
            self.memory = Memory(torch.randn(B, cfg.mem_len, d, generator=g).to(self.device),
                                 torch.zeros(B, cfg.mem_len, 3 * HD, device=self.device))
        self.injection = torch.randn(B, L, 3 * HD, generator=g).to(self.device)
        self.readout = torch.randn(B, L, d, generator=g).to(self.device)

    def _new_model(self, variant: str) -> nn.Module:
        cfg = self.spec.config(pre_ln=variant == "pre_ln")
        model = DEQTransformerLM(cfg, self.spec.vocab, self.forward_settings, self.backward_settings,
                                 explicit=variant.startswith("untied"))
        if variant.startswith("untied"):
            depth = int(variant[len("untied"):])
            self._set_layer(model, _Stack([model.layer] + [TransformerLayer(cfg) for _ in range(depth - 1)]))
        return model

    def _layer(self, model: nn.Module) -> nn.Module:
        return model.layer

    def _set_layer(self, model: nn.Module, layer: nn.Module) -> None:
        # The DEQ module holds the layer too: replaced with it, so that the old one is no
        # submodule left over (its weight normalization would run every step).
        model.layer = layer
        model.deq = DEQ(layer, model.deq.forward_solver, model.deq.backward_solver)

    def _forward(self, model: nn.Module, layers: int | None, core: bool) -> StepOutput:
        if not core:
            out = model.run(self.inputs, self.targets, self.memory, layers=layers)
            return StepOutput(loss=out.loss, stats=out.stats)
        u = self.injection.detach().requires_grad_()  # a fresh leaf: its gradient is this step's
        stats = None
        with once_per_step(model):
            ctx = model.context(u, self.memory)
            z = u.new_zeros(self.readout.shape)
            if layers is None:
                z, stats = model.deq(ctx, z)
            else:
                for _ in range(layers):
                    z = model.layer(z, ctx)
        return StepOutput(loss=(z * self.readout).mean(), stats=stats)

    def state_bytes(self) -> int:
        return self.readout.numel() * self.readout.element_size()


class MDEQSteps(_Steps):
    """Steps of the CIFAR-10 MDEQ on ``batch`` seeded images ``(batch, 3, S, S)`` and labels.
    The layer step's injection is shaped like the highest-resolution state, its readout like
    every scale's state, both seeded. Variants: ``"default"``, ``"untiedK"`` (K distinct
    multiscale maps)."""

    def __init__(self, spec: MDEQSpec, seed: int = 0, device: torch.device | str = "cpu", phantom_steps: int = 5):
        super().__init__(seed, device)
        self.spec, self.phantom_steps = spec, phantom_steps
        self.forward_settings, self.backward_settings = spec.forward, spec.backward
        cfg = spec.config()
        B = spec.batch
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(self.device)
        self.labels = torch.randint(0, cfg.num_classes, (B,), generator=g).to(self.device)
        shapes = [(B, c, s, s) for c, s in zip(cfg.channels, cfg.sizes)]
        self.injection = torch.randn(*shapes[0], generator=g).to(self.device)
        self.readout = [torch.randn(*shape, generator=g).to(self.device) for shape in shapes]

    def _new_model(self, variant: str) -> nn.Module:
        cfg = self.spec.config()
        model = MDEQ(cfg, self.forward_settings, self.backward_settings)
        if variant.startswith("untied"):
            depth = int(variant[len("untied"):])
            self._set_layer(model, _Stack([model.f] + [MultiscaleMap(cfg) for _ in range(depth - 1)]))
        return model

    def _layer(self, model: nn.Module) -> nn.Module:
        return model.f

    def _set_layer(self, model: nn.Module, layer: nn.Module) -> None:
        model.f = layer
        model.deq = DEQ(layer, model.deq.forward_solver, model.deq.backward_solver)

    def _forward(self, model: nn.Module, layers: int | None, core: bool) -> StepOutput:
        if not core:
            if layers is None:
                return model((self.images, self.labels))
            logits = model.unrolled(self.images, layers)
            return StepOutput(loss=nn.functional.cross_entropy(logits, self.labels))
        u = self.injection.detach().requires_grad_()  # a fresh leaf: its gradient is this step's
        stats = None
        with once_per_step(model):
            z = [torch.zeros_like(w) for w in self.readout]
            if layers is None:
                z, stats = model.deq(u, z)
            else:
                for _ in range(layers):
                    z = model.f(z, u)
        loss = sum((zi * wi).mean() for zi, wi in zip(z, self.readout))
        return StepOutput(loss=loss, stats=stats)

    def state_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.readout)


def measure_memory(step: StepFn, device: torch.device | str = "cpu") -> dict:
    """One run of ``step`` measured (:func:`deqlib.measure.step_memory`): ``peak_live_bytes``,
    ``saved_bytes``, ``cuda_peak_bytes`` (None off CUDA), and the step's NFE."""
    info: dict = {}
    mem = step_memory(lambda: info.update(step()), device)
    return {"peak_live_bytes": mem.peak_live_bytes, "saved_bytes": mem.saved_bytes,
            "cuda_peak_bytes": mem.cuda_peak_bytes, **info}


def solver_buffers(steps: _Steps, k: int, backward_nfe: int, penalty: JacobianPenalty | None = None,
                   variant: str = "default") -> dict:
    """The forward and backward solvers' own bytes in an implicit layer step at ``k`` /
    ``backward_nfe`` calls (:class:`BufferProbe`), also in states of ``z``."""
    step, fwd, bwd = steps.probe_step(k, backward_nfe, penalty, variant)
    step()
    state = steps.state_bytes()
    return {"fwd_solver_bytes": fwd.record[-1], "bwd_solver_bytes": bwd.record[-1],
            "fwd_solver_states": fwd.record[-1] / state, "bwd_solver_states": bwd.record[-1] / state}


def time_rounds(steps: Mapping[str, StepFn], repeats: int,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Wall times in seconds of each step, ``repeats`` of each after one warm-up: in rounds (every
    step once per round), so that a slow spell of a shared machine falls on all of them and
    round ``r`` of two steps can be paired."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times

