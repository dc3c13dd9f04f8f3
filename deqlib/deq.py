"""The DEQ layer: solve ``z* = f(z*, x)`` without autograd, then differentiate.

Three ways to differentiate (``backward=``):
- ``"implicit"``: one differentiable call ``f(z*, x)``; its incoming gradient ``g`` is replaced
  by the solution ``u`` of ``u = u J_f(z*) + g`` (implicit function theorem), found by its own
  solver (``backward_solver``). Memory of one call of ``f``. First derivatives only:
  differentiating its gradient again (``create_graph=True``) raises, since ``u`` and ``z*`` are
  held fixed in it and the second derivative would come out wrong without a word.
- ``"phantom"``: ``k`` damped steps ``z <- (1-lam) z + lam f(z, x)`` from ``z*`` under autograd
  (an inexact, cheap gradient). Its derivatives of every order are those of the ``k`` steps
  with ``z*`` a constant, so its second derivative is not the equilibrium's.
- ``"unrolled"``: plain iteration from ``z0`` under autograd through every step, up to the
  forward ``max_iter``, stopping at its ``tol`` (the forward settings must name
  ``method="fixed_point"``: another method is refused rather than silently replaced): the exact
  reference, and the weight-tied "pretraining" mode. Exact to any order for the iteration it
  ran; once converged, the equilibrium's (the reference for second derivatives).

States may be one tensor ``(B, ...)`` or a list of them (one feature map per scale); they are
packed into one ``(B, D)`` tensor for the solvers by :class:`StatePacker`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_choice, check_int, check_real
from .solvers import ResidualTracker, SolverResult, check_method_options, check_solver_args, solve

__all__ = ["SolverSettings", "DEQStats", "DEQ", "StatePacker", "BACKWARD_MODES"]

State = Tensor | Sequence[Tensor]
BACKWARD_MODES = ("implicit", "phantom", "unrolled")


@dataclass(frozen=True)
class SolverSettings:
    """How one solve is done: method, budget, tolerance and the method's own options.

    Validated on construction: a bad value raises ValueError naming it.
    """

    method: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-3
    stop_mode: str = "rel"
    options: Mapping[str, Any] = field(default_factory=dict)
    check_every: int = 1

    def __post_init__(self) -> None:
        check_solver_args(self.max_iter, self.tol, self.stop_mode, 2.0)
        check_method_options(self.method, self.options)
        check_int("check_every", self.check_every, 1)

    def replace(self, **changes: Any) -> SolverSettings:
        return dataclasses.replace(self, **changes)

    def run(self, f: Callable[[Tensor], Tensor], z0: Tensor) -> SolverResult:
        return solve(f, z0, self.method, self.max_iter, self.tol, self.stop_mode, check_every=self.check_every,
                     **self.options)


def _structure(state: Any) -> str:
    """What a state is, in words: ``a tensor (2, 3)``, ``a list of [(2, 3), (2, 4)]``."""
    if isinstance(state, Tensor):
        return f"a tensor {tuple(state.shape)}"
    if isinstance(state, (list, tuple)):
        parts = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in state]
        return f"a {type(state).__name__} of {parts}"
    return f"a {type(state).__name__}"


class StatePacker:
    """Packs a list of per-sample tensors ``[(B, *s_i)]`` into one ``(B, sum_i prod(s_i))``.

    A single tensor is handled as a list of one and unpacked back to a tensor.
    """

    def __init__(self, state: State):
        self.single = isinstance(state, Tensor)
        tensors = [state] if self.single else list(state)
        if not tensors:
            raise ValueError("the state must hold at least one tensor, got an empty list")
        if any(t.dim() < 1 or t.shape[0] < 1 for t in tensors):
            raise ValueError(f"every state tensor needs a batch dimension of size >= 1, got shapes "
                             f"{[tuple(t.shape) for t in tensors]}")
        self.batch = tensors[0].shape[0]
        for t in tensors:
            if t.shape[0] != self.batch:
                shapes = [tuple(x.shape) for x in tensors]
                raise ValueError(f"all state tensors need the same batch size, got {shapes}")
        self.shapes = [t.shape[1:] for t in tensors]
        self.sizes = [t[0].numel() for t in tensors]

    def pack(self, state: State) -> Tensor:
        """``state`` as ``(B, D)``. ValueError naming both structures if ``state`` is not shaped
        like the one this packer was made from: flattening alone would read an output of ``f``
        of another shape but as many numbers (transposed, scales swapped) in the wrong order."""
        if self.single and isinstance(state, Tensor) and state.shape[1:] == self.shapes[0] \
                and state.shape[0] == self.batch:
            return state.reshape(self.batch, -1)
        if not self.single and isinstance(state, (list, tuple)) and len(state) == len(self.shapes) \
                and all(isinstance(t, Tensor) and t.shape[0:1] == (self.batch,) and t.shape[1:] == s
                        for t, s in zip(state, self.shapes)):
            return torch.cat([t.reshape(self.batch, -1) for t in state], dim=1)
        full = [(self.batch, *s) for s in self.shapes]
        expected = f"a tensor {full[0]}" if self.single else f"a list of {full}"
        raise ValueError(f"f(z, x) must return the structure of z0, {expected}; got {_structure(state)}")

    def unpack(self, flat: Tensor) -> State:
        if self.single:
            return flat.view(self.batch, *self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.view(self.batch, *s) for p, s in zip(parts, self.shapes)]


@dataclass
class DEQStats:
    """Statistics of one DEQ call. ``backward`` is filled in when the implicit backward runs.

    Attributes:
        forward: the forward solve (for ``"unrolled"``: the record of the unrolled iteration).
        backward: the backward solve of ``u = u J + g``, or None before/without it.
    """

    forward: SolverResult
    backward: SolverResult | None = None
    _pair: Callable[[], tuple[Tensor, Tensor]] | None = field(default=None, repr=False)

    def jacobian_inputs(self) -> tuple[Tensor, Tensor]:
        """``(z_star, f_star)``, both ``(B, D)``: ``z*`` and ``f(z*)`` with its graph, so that
        vector-Jacobian products of ``J_f(z*)`` (e.g. the Jacobian penalty) can be taken. Never
        a new call of ``f``: in implicit and phantom mode this is the forward's differentiable
        call at the leaf ``z*``; in unrolled mode, the last unrolled call (``z*`` its input,
        part of the unrolled graph)."""
        if self._pair is None:
            raise RuntimeError("no graph at z*: the DEQ was called without autograd")
        return self._pair()


class _ImplicitGrad(torch.autograd.Function):
    """Identity on ``f(z*)`` whose backward solves ``u = u J_f(z*) + g`` and returns ``u``.

    The VJPs use the graph of ``f_star`` w.r.t. the leaf ``z_star``; that graph lies upstream of
    this node, so differentiating it inside this backward cannot re-enter this node (no hook
    to remove, and two calls before one backward keep separate contexts).
    """

    @staticmethod
    def forward(ctx, f_star: Tensor, z_star: Tensor, settings: SolverSettings, stats: DEQStats):
        # Saved, not kept as attributes: autograd frees them with the graph, and keeps them when
        # the backward is asked to retain it (a second backward over the same graph).
        ctx.save_for_backward(f_star, z_star)
        ctx.settings, ctx.stats = settings, stats
        return f_star.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        f_star, z_star = ctx.saved_tensors

        def step(u: Tensor) -> Tensor:  # u -> u J + g
            (uj,) = torch.autograd.grad(f_star, z_star, u, retain_graph=True, allow_unused=True)
            return grad if uj is None else uj + grad

        # Start at g (the solution when J = 0): saves the call a zero start would spend.
        result = ctx.settings.run(step, grad)
        ctx.stats.backward = result
        if torch.is_grad_enabled():  # create_graph=True: the gradient may be differentiated
            return _FirstOrderOnly.apply(result.fz, f_star, grad), None, None, None
        return result.fz, None, None, None


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the implicit backward's solution ``u``, in a graph that refuses to be
    differentiated: the exact first derivative stays available under ``create_graph=True``,
    but a second derivative raises instead of coming out silently wrong.

    Why wrong: ``u`` comes from a solve without autograd and ``z*`` is a detached leaf, so a
    second derivative would miss how both move with the parameters (about 100% of it on a
    small contractive map). Getting it would take a differentiable backward solve and ``z*``
    tied to the parameters by a further implicit solve. ``u``'s value depends on ``f(z*)``'s
    graph (the parameters, the input, ``z*``) and on the incoming gradient; both are inputs
    here, so a second derivative with respect to anything ``u`` depends on reaches this node.
    """

    @staticmethod
    def forward(ctx, u: Tensor, f_star: Tensor, grad: Tensor) -> Tensor:
        return u.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "backward='implicit' gives exact first derivatives only: a second derivative through "
            "it (differentiating a gradient taken with create_graph=True) would omit how z* and "
            "the backward solution depend on the parameters. Use backward='unrolled' (exact to "
            "any order for its unrolled iteration, the equilibrium's once converged), or take "
            "first derivatives only."
        )


def _check_unrolled(settings: SolverSettings, name: str) -> None:
    """The unrolled mode iterates ``z <- f(z)`` itself: its forward settings must say so, or
    another method's name and options would be ignored without a word."""
    if settings.method != "fixed_point" or float(settings.options.get("beta", 1.0)) != 1.0:
        raise ValueError(f"backward='unrolled' runs plain fixed-point iteration (its max_iter, tol and stop_mode); "
                         f"{name} must say method='fixed_point' without damping, got method={settings.method!r}, "
                         f"options={dict(settings.options)!r}")


class DEQ(nn.Module):
    """Deep equilibrium layer around ``f(z, x)``.

    Args:
        f: the map; called as ``f(z, x)`` with ``z`` shaped like ``z0`` (a tensor or a list).
            An ``nn.Module`` is registered, so its parameters belong to this layer.
        forward_solver: settings of the forward solve.
        backward_solver: settings of the implicit backward solve.
        backward: ``"implicit"`` (first derivatives only), ``"phantom"`` or ``"unrolled"``
            (see the module docstring for what each gives to second order).
        phantom_steps, phantom_damping: ``k`` and ``lam`` of the phantom gradient.

    Call: ``z, stats = deq(x, z0, forward_solver=None)`` returns ``f(z*, x)`` (one step past the
    best iterate, shaped like ``z0``) and :class:`DEQStats`. ``forward_solver`` overrides the
    forward settings for this call (e.g. a hard NFE cap at evaluation).
    """

    def __init__(
        self,
        f: Callable[[State, Any], State],
        forward_solver: SolverSettings | None = None,
        backward_solver: SolverSettings | None = None,
        backward: str = "implicit",
        phantom_steps: int = 5,
        phantom_damping: float = 0.8,
    ):
        super().__init__()
        check_choice("backward", backward, BACKWARD_MODES)
        check_int("phantom_steps", phantom_steps, 1)
        check_real("phantom_damping", phantom_damping, minimum=0, maximum=1, min_open=True)
        self.f = f
        # unrolled: plain iteration by default, and refused settings of another method
        self.forward_solver = forward_solver or SolverSettings(**({"method": "fixed_point"} if backward == "unrolled"
                                                                  else {}))
        if backward == "unrolled":
            _check_unrolled(self.forward_solver, "forward_solver")
        self.backward_solver = backward_solver or SolverSettings(tol=1e-4)
        self.backward = backward
        self.phantom_steps = int(phantom_steps)
        self.phantom_damping = float(phantom_damping)

    def forward(
        self, x: Any, z0: State, forward_solver: SolverSettings | None = None
    ) -> tuple[State, DEQStats]:
        packer = StatePacker(z0)
        settings = forward_solver or self.forward_solver

        def f_flat(z: Tensor) -> Tensor:
            return packer.pack(self.f(packer.unpack(z), x))

        z0_flat = packer.pack(z0)
        if self.backward == "unrolled":
            _check_unrolled(settings, "forward_solver")
            out, stats = self._unrolled(f_flat, z0_flat, settings)
            return packer.unpack(out), stats

        with torch.no_grad():
            result = settings.run(f_flat, z0_flat.detach())
        stats = DEQStats(forward=result)
        if not torch.is_grad_enabled():
            return packer.unpack(result.fz.reshape(packer.batch, -1)), stats

        z_star = result.z.reshape(packer.batch, -1).detach().requires_grad_()
        f_star = f_flat(z_star)
        if self.backward == "implicit":
            stats._pair = lambda: (z_star, f_star)
            out = _ImplicitGrad.apply(f_star, z_star, self.backward_solver, stats)
        else:  # phantom: k damped unrolled steps from z*, the first one reusing f_star
            stats._pair = lambda: (z_star, f_star)
            lam = self.phantom_damping
            z = torch.lerp(z_star, f_star, lam)
            for _ in range(self.phantom_steps - 1):
                z = torch.lerp(z, f_flat(z), lam)
            out = z
        return packer.unpack(out), stats

    def _unrolled(
        self, f_flat: Callable[[Tensor], Tensor], z: Tensor, settings: SolverSettings
    ) -> tuple[Tensor, DEQStats]:
        grad = torch.is_grad_enabled()
        if grad and not z.requires_grad:
            # A start that is part of the graph, so that the last call's pair below can give
            # vector-Jacobian products even when that call was the first.
            z = z.detach().requires_grad_()
        tracker = ResidualTracker(settings.max_iter, settings.tol, settings.stop_mode, 1e6)
        while True:
            fz = f_flat(z)
            if tracker.record(z.detach(), fz.detach(), (fz - z).detach()):
                break
            z = fz
        stats = DEQStats(forward=tracker.result(z.shape))
        if grad:
            # The pair of the last call, made now: a call of f from ``jacobian_inputs`` would
            # come after the caller's ``once_per_step`` block (a new dropout mask, the weights
            # normalized again) and cost one call more. Its ``z`` is not a leaf: a penalty on
            # it is differentiated through every unrolled step, as the loss is in this mode.
            z_last = z
            stats._pair = lambda: (z_last, fz)
        return fz, stats
