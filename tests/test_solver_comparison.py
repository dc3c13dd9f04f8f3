"""The solver comparison (notebook 07): problems, library adapters, counting, gradient checks."""

import sys

import pytest
import torch

from deqlib.experiments.solver_study import (
    LIBRARIES, METHODS, PROBLEMS, CallRecorder, ConvMap, ConvSpec, FlatMap, MDEQSpec, SolversExperiment,
    SyntheticSpec, TransformerSpec, build_problem, calibrate_scale, compare, contraction_path, gradient_error,
    library_solver, measure_solve, recommendations, reference, resolve_libraries, torchdeq_version,
)
from deqlib.jacobian import spectral_radius
from deqlib.solvers import solve

TINY = SolversExperiment(
    synthetic=SyntheticSpec(batch=16), conv=ConvSpec(batch=2, channels=8, size=8, groups=4),
    mdeq=MDEQSpec(batch=2, channels=(16, 32), expansion=2, groups=4, downsample=1, image_size=16),
    transformer=TransformerSpec(batch=2, d_model=32, n_head=2, d_head=16, d_inner=64, tgt_len=8, mem_len=8,
                                vocab=100),
    easy_nfe=(10, 20), hard_nfe=(60, 90), repeats=1, radius_iters=60, max_iter=150, contract_steps=30,
)
HAVE_TORCHDEQ = torchdeq_version() is not None
AVAILABLE = [lib for lib in LIBRARIES if lib == "deqlib" or HAVE_TORCHDEQ]


@pytest.fixture(scope="module")
def problems():
    return {name: build_problem(name, TINY) for name in PROBLEMS}


@pytest.mark.parametrize("name", PROBLEMS)
def test_problem_is_deterministic_in_its_seed(name, problems):
    a, b = problems[name], build_problem(name, TINY)
    other = build_problem(name, SolversExperiment(**{**TINY.__dict__, "seed": 1}))
    z = torch.randn(a.z0.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fa, fb, fo = a.f(z), b.f(z), other.f(z)
    assert torch.equal(fa, fb) and torch.equal(a.grad_out, b.grad_out) and a.scale == b.scale
    assert not torch.equal(fa, fo)
    assert a.f(a.z0).shape == a.z0.shape == a.grad_out.shape and a.z0.dim() == 2


def _radius(problem) -> float:
    z_star = solve(problem.f, problem.z0, method="anderson", max_iter=500, tol=1e-6).z
    z = z_star.requires_grad_()
    fz = problem.f(z)
    return float(spectral_radius(z, fz, n_iter=150, generator=torch.Generator().manual_seed(0)).max())


@pytest.mark.parametrize("kind", sorted({n.removesuffix("_hard") for n in PROBLEMS}))
def test_hard_variant_contracts_slower(kind, problems):
    easy, hard = problems[kind], problems[f"{kind}_hard"]
    assert hard.scale > easy.scale
    assert _radius(hard) > _radius(easy)
    nfe = [solve(p.f, p.z0, "fixed_point", max_iter=500, tol=TINY.tol).nfe for p in (easy, hard)]
    assert nfe[1] > 2 * nfe[0], nfe


def test_calibration_lands_in_target():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A /= torch.linalg.eigvals(A).abs().max()  # spectral radius 1
    x = torch.randn(3, 30, generator=g, dtype=torch.float64)
    def set_scale(s):
        return lambda z: (0.99 * s / 64) * z @ A.T + x  # contraction s/64, slower as s grows

    s = calibrate_scale(set_scale, torch.zeros_like(x), 1e-6, target=(40, 60))
    nfe = solve(set_scale(s), torch.zeros_like(x), "fixed_point", max_iter=100, tol=1e-6).nfe
    assert 40 <= nfe <= 60
    with pytest.raises(ValueError, match="target"):
        calibrate_scale(set_scale, torch.zeros_like(x), 1e-6, target=(60, 40))


def test_conv_map_input_follows_dtype():
    f = ConvMap(8, torch.randn(2, 8, 4, 4), groups=4).double()
    assert f.x.dtype == torch.float64
    assert f(torch.zeros(2, 8, 4, 4, dtype=torch.float64)).dtype == torch.float64


class Counting:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


@pytest.mark.parametrize("library", AVAILABLE)
@pytest.mark.parametrize("method", METHODS)
def test_nfe_counts_every_call_of_f(library, method, problems):
    p = problems["conv_hard"]
    solver = library_solver(library, method)
    counted = Counting(p.f)
    rec = CallRecorder(counted, record=True)
    with torch.no_grad():
        answer = solver(rec, p.z0, method, 40, 1e-4)
    assert rec.calls == counted.calls > 2 and len(rec.trace) == rec.calls
    assert answer.shape == p.z0.shape
    if library == "deqlib":
        res = solve(p.f, p.z0, method=method, max_iter=40, tol=1e-4)
        assert res.nfe == rec.calls
        torch.testing.assert_close(torch.tensor([r for _, _, r in rec.trace]), res.rel_trace.max(dim=1).values)
    # measure_solve: one recorded solve, one residual call, (repeats - 1) timed, one under the
    # memory counter; with repeats=1 that is 2 NFE + 1 calls of f.
    counted = Counting(p.f)
    m = measure_solve(solver, counted, p.z0, method, 40, 1e-4, repeats=1, call_s=1.0, call_peak=0)
    assert m.nfe == rec.calls and counted.calls == 2 * m.nfe + 1
    assert [n for n, _, _ in m.trace] == list(range(1, m.nfe + 1))


def test_reference_gradient_matches_unrolled_autograd(problems):
    """The implicit gradient of L = <w, z*> against autograd through 400 plain steps."""
    p = problems["synthetic"].to(torch.float64)
    ref = reference(p, tol=1e-12)
    assert ref.forward_residual < 1e-12 and ref.backward_residual < 1e-12
    z = p.z0
    for _ in range(400):
        z = p.f(z)
    (unrolled := torch.autograd.grad((p.grad_out * z).sum(), p.params()))
    flat = torch.cat([g.reshape(-1) for g in unrolled])
    assert gradient_error(flat, ref.grad) < 1e-8
    assert gradient_error(ref.grad, ref.grad) == 0.0
    assert gradient_error(-ref.grad, ref.grad) == pytest.approx(2.0)
    # A wrong gradient: the one-step ("Jacobian-free") approximation, u = w.
    z_star = ref.z_star.detach().requires_grad_()
    wrong = torch.autograd.grad(p.f(z_star), p.params(), p.grad_out)
    assert gradient_error(torch.cat([g.reshape(-1) for g in wrong]), ref.grad) > 0.1
    with pytest.raises(ValueError, match="shapes"):
        gradient_error(flat[:-1], ref.grad)


def test_without_torchdeq_the_comparison_runs_deqlib_only(monkeypatch):
    for mod in [m for m in sys.modules if m == "torchdeq" or m.startswith("torchdeq.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # makes `import torchdeq` fail
    assert torchdeq_version() is None
    libs, note = resolve_libraries(["deqlib", "torchdeq"])
    assert libs == ["deqlib"] and "torchdeq is not installed" in note
    with pytest.raises(ValueError, match="torchdeq"):
        library_solver("torchdeq", "anderson")
    exp = SolversExperiment(**{**TINY.__dict__, "problems": ("synthetic",), "radius_iters": 5})
    cmp = compare(exp)
    assert cmp.libraries == ["deqlib"] and "not installed" in cmp.note
    assert {(r["library"], r["method"]) for r in cmp.rows} == {("deqlib", m) for m in METHODS}
    assert all(r["fwd_converged"] and r["grad_error"] < 0.1 for r in cmp.rows)
    assert {c["library"] for c in cmp.curves} == {"deqlib"}


@pytest.mark.parametrize(
    "kwargs, name",
    [({"problems": ("synthetic", "mystery")}, "mystery"), ({"methods": ("newton",)}, "newton"),
     ({"libraries": ("jaxopt",)}, "jaxopt"), ({"problems": ()}, "problems"),
     ({"tol": 0.0}, "tol=0.0"), ({"hard_nfe": (50, 10)}, "hard_nfe"), ({"repeats": 0}, "repeats=0"),
     ({"contract_steps": 0}, "contract_steps=0"), ({"contract_lr": -1.0}, "contract_lr=-1.0"),
     ({"device": "tpu"}, "device='tpu'")],
)
def test_bad_config_raises_naming_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SolversExperiment(**kwargs)


@pytest.mark.parametrize(
    "build, name",
    [(lambda: MDEQSpec(groups=3), "groups=3"), (lambda: MDEQSpec(batch=0), "batch=0"),
     (lambda: MDEQSpec(channels=(16, 32, 64), image_size=2), "image_size=2"),
     (lambda: TransformerSpec(d_model=63), "d_model"), (lambda: TransformerSpec(vocab=1), "vocab=1"),
     (lambda: TransformerSpec(batch=0), "batch=0")],
)
def test_bad_model_specs_raise_naming_the_value(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA device")
def test_cuda_device_without_cuda_is_refused_before_any_compute():
    with pytest.raises(ValueError, match="device='cuda'"):
        SolversExperiment(device="cuda")
    assert SolversExperiment(device="auto").torch_device().type == "cpu"


def test_contraction_path_runs_from_a_regularized_map_to_the_initial_one():
    """t = 1 restores the initial weights exactly; t = 0 (after the penalty steps) is a map on
    which plain iteration converges, where the initial MDEQ map's does not."""
    from deqlib.models.mdeq import MultiscaleMap, Stem

    cfg = TINY.mdeq.config()
    torch.manual_seed(0)
    inner, stem = MultiscaleMap(cfg).eval(), Stem(cfg)
    with torch.no_grad():
        x = stem(torch.randn(2, 3, 16, 16))
    example = [torch.zeros(2, c, s, s) for c, s in zip(cfg.channels, cfg.sizes)]
    f = FlatMap(inner, example, x)
    z0 = f.packer.pack(example)
    initial = [p.detach().clone() for p in f.parameters()]
    assert solve(f, z0, "fixed_point", max_iter=300, tol=1e-3).status != "converged"
    at = contraction_path(f, z0, steps=30, lr=0.01, seed=0)
    assert at(1.0) is f and all(torch.equal(p, q) for p, q in zip(f.parameters(), initial))
    at(0.0)
    assert solve(f, z0, "fixed_point", max_iter=300, tol=1e-3).status == "converged"
    at(1.0)
    assert all(torch.equal(p, q) for p, q in zip(f.parameters(), initial))


def test_transformer_problem_converts_its_context_but_not_its_indices(problems):
    p64 = problems["transformer"].to(torch.float64)
    ctx = p64.f.inner
    assert ctx.u.dtype == ctx.mem.dtype == ctx.pos.dtype == torch.float64
    assert ctx.dist.dtype == torch.long and ctx.mask.dtype == torch.bool
    z = torch.randn(p64.z0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert p64.f(z).dtype == torch.float64


def test_bench_compare_writes_rows_and_ratios(tmp_path, capsys):
    import json

    from deqlib.bench import main

    out = tmp_path / "compare.json"
    assert main(["compare", "--profile", "small", "--set", "problems=[synthetic]", "--set", "repeats=1",
                 "--set", "libraries=[deqlib]", "--set", "radius_iters=5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {(r["problem"], r["method"]) for r in report["rows"]} == {("synthetic", m) for m in METHODS}
    assert all(r["fwd_converged"] for r in report["rows"]) and "checks" not in report
    assert set(report["ratios"]) == {"fwd", "bwd"} and set(report["ratios"]["fwd"]) == set(METHODS)
    assert "deqlib/torchdeq" not in capsys.readouterr().out  # nothing to compare with deqlib alone


def test_bad_names_raise_naming_them():
    with pytest.raises(ValueError, match="'mystery'"):
        build_problem("mystery", TINY)
    with pytest.raises(ValueError, match="'newton'"):
        library_solver("deqlib", "newton")
    with pytest.raises(ValueError, match="'jaxopt'"):
        library_solver("jaxopt", "anderson")
    with pytest.raises(ValueError, match="'jaxopt'"):
        resolve_libraries(["deqlib", "jaxopt"])


def _row(problem, method, fwd, bwd, ok=True):
    return {"problem": problem, "library": "deqlib", "method": method, "fwd_nfe": fwd, "bwd_nfe": bwd,
            "fwd_converged": ok, "bwd_converged": ok}


def test_recommendation_follows_the_call_counts():
    rows = [_row("a", "fixed_point", 20, 20), _row("a", "anderson", 10, 10), _row("a", "broyden", 12, 12),
            _row("b", "fixed_point", 20, 20), _row("b", "anderson", 17, 17),
            _row("c", "fixed_point", 200, 200, ok=False), _row("c", "broyden", 90, 90),
            _row("d", "anderson", 50, 50, ok=False)]
    recs = {r["problem"]: r for r in recommendations(rows, min_saving=1.3)}
    assert recs["a"]["use"] == "anderson" and recs["a"]["saving"] == 2.0
    assert recs["b"]["use"] == "fixed_point" and recs["b"]["calls fwd+bwd"] == 40  # 1.18x < 1.3x
    assert recs["c"]["use"] == "broyden" and recs["c"]["plain iteration calls"] == "not converged"
    assert recs["d"]["use"] == "none converged"
    assert recommendations(rows, min_saving=1.0)[1]["use"] == "anderson"
    with pytest.raises(ValueError, match="min_saving=0.5"):
        recommendations(rows, min_saving=0.5)


def test_steady_malloc_applies_on_glibc():
    import platform

    from deqlib.measure import steady_malloc

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert steady_malloc() is True
