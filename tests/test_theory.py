"""The symbolic derivations of mobiletl_edu.theory, checked against independent truth:
torch autograd (numerically, float64), sympy identities and brute-force evaluation."""
import math

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mobiletl_edu import theory as th
from mobiletl_edu.ops import sign_hardswish, sign_relu6

TORCH_FORWARD = {"relu6": F.relu6, "hardswish": F.hardswish}
SIGN_FORWARD = {"relu6": sign_relu6, "hardswish": sign_hardswish}
KINKS = {"relu6": [0.0, 6.0], "hardswish": [-3.0, 3.0]}
GRID = [i / 8 for i in range(-80, 81)]  # -10 .. 10, kinks and the points +-1.5 included


def torch_derivative(fn, points):
    t = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    fn(t).sum().backward()
    return t.grad.tolist()


def input_gradient(fn, x, upstream):
    x = x.clone().requires_grad_(True)
    fn(x).backward(upstream)
    return x.grad


def at(expr, point):
    return float(expr.subs(th.x, sp.Rational(point)))


# ---------------------------------------------------------------- activations (Table 2)

@pytest.mark.parametrize("kind", th.ACTIVATIONS)
def test_forward_matches_torch(kind):
    forward = th.relu6() if kind == "relu6" else th.hardswish()
    expected = TORCH_FORWARD[kind](torch.tensor(GRID, dtype=torch.float64)).tolist()
    assert [at(forward, p) for p in GRID] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", th.ACTIVATIONS)
def test_derivative_matches_torch_autograd_everywhere_kinks_included(kind):
    """Away from kinks any correct derivative agrees; at the kinks the Piecewise was written to
    take torch's value, so the whole grid (kinks included) must agree."""
    derivative = th.exact_derivative(kind)
    expected = torch_derivative(TORCH_FORWARD[kind], GRID)
    assert [at(derivative, p) for p in GRID] == pytest.approx(expected, abs=1e-12)
    for k in KINKS[kind]:
        assert k in GRID


@pytest.mark.parametrize("kind", th.ACTIVATIONS)
@given(point=st.floats(-12, 12, allow_nan=False).filter(lambda p: min(abs(p - k) for k in (-3, 0, 3, 6)) > 1e-6))
@settings(max_examples=60, deadline=None)
def test_derivative_matches_central_difference(kind, point):
    """Independent of torch's backward: a finite difference of the forward pass."""
    h = 1e-7
    fwd = TORCH_FORWARD[kind]
    t = torch.tensor([point - h, point + h], dtype=torch.float64)
    fd = (fwd(t[1:]) - fwd(t[:1])).item() / (2 * h)
    exact = float(th.exact_derivative(kind).subs(th.x, point))
    assert exact == pytest.approx(fd, abs=1e-5)


@pytest.mark.parametrize("kind", th.ACTIVATIONS)
def test_sign_derivative_matches_the_package(kind):
    expected = torch_derivative(SIGN_FORWARD[kind], GRID)
    assert [at(th.sign_derivative(), p) for p in GRID] == expected


def test_table2_formula_agrees_except_at_plus_minus_three():
    """Table 2's printed Hard-Swish backward is the derivative with other values at the kinks."""
    paper, ours = th.table2_hardswish_derivative(), th.hardswish_derivative()
    differ = [p for p in GRID if at(paper, p) != at(ours, p)]
    assert differ == [-3.0, 3.0]
    assert (at(paper, -3), at(paper, 3)) == (-0.5, 1.5)


def test_exact_sets_match_the_brute_force_grid():
    for kind in th.ACTIVATIONS:
        error, exact = th.approximation_error(kind), th.exact_set(kind)
        for p in GRID:
            assert (at(error, p) == 0) == (sp.Rational(p) in exact), (kind, p)
    assert th.exact_set("hardswish") == sp.Union(sp.Interval(-sp.oo, -3), sp.FiniteSet(-sp.Rational(3, 2), sp.Rational(3, 2)),
                                                 sp.Interval(3, sp.oo))
    assert th.exact_set("relu6") == sp.Union(sp.Interval.open(-sp.oo, 0), sp.Interval.open(0, 6))


def test_error_bound_is_one_half_attained_only_at_zero_for_hardswish():
    extrema = th.error_extrema("hardswish")
    assert extrema.sup == sp.Rational(1, 2) and extrema.attained == sp.FiniteSet(0)
    # torch agrees, and every grid point but 0 stays strictly inside the bound
    x = torch.tensor(GRID, dtype=torch.float64)
    upstream = torch.linspace(-3, 3, len(GRID), dtype=torch.float64)
    gap = (input_gradient(sign_hardswish, x, upstream) - input_gradient(F.hardswish, x, upstream)).abs()
    assert torch.all(gap <= upstream.abs() / 2 + 1e-15)
    on_bound = (gap == upstream.abs() / 2) & (upstream != 0)
    assert x[on_bound].tolist() == [0.0]


def test_relu6_error_is_one_at_zero_and_from_six_on():
    extrema = th.error_extrema("relu6")
    assert extrema.sup == 1 and extrema.attained == sp.Union(sp.FiniteSet(0), sp.Interval(6, sp.oo))


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="relu6, hardswish"):
        th.exact_derivative("gelu")


# ---------------------------------------------------------------- BatchNorm (Eq. 1-2)

@pytest.fixture(scope="module")
def bn():
    return th.bn_gradients(3)


def _numeric_bn_case(seed=0, m=3):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(m, dtype=torch.float64, generator=gen) * 2 + 0.5
    gs = torch.randn(m, dtype=torch.float64, generator=gen)
    return xs, gs, dict(gamma=1.7, beta=-0.3, mu=0.4, var=2.5, eps=1e-5)


def _subs(bn, xs, gs, p):
    values = {**dict(zip(bn.xs, xs.tolist())), **dict(zip(bn.gs, gs.tolist())), bn.gamma: p["gamma"],
              bn.beta: p["beta"], bn.mu: p["mu"], bn.var: p["var"], bn.eps: p["eps"]}
    return lambda e: float(e.subs(values))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bn_gradients_match_torch_autograd(bn, mode, seed):
    xs, gs, p = _numeric_bn_case(seed)
    x = xs.view(len(xs), 1).clone().requires_grad_(True)  # (batch m, channels 1)
    gamma = torch.tensor([p["gamma"]], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([p["beta"]], dtype=torch.float64, requires_grad=True)
    running_mean = torch.tensor([p["mu"]], dtype=torch.float64)
    running_var = torch.tensor([p["var"]], dtype=torch.float64)
    y = F.batch_norm(x, running_mean, running_var, gamma, beta, training=(mode == "train"), eps=p["eps"])
    y.backward(gs.view_as(y))
    ev = _subs(bn, xs, gs, p)
    grads = getattr(bn, mode)
    assert ev(grads["gamma"]) == pytest.approx(gamma.grad.item(), rel=1e-10)
    assert ev(grads["beta"]) == pytest.approx(beta.grad.item(), rel=1e-10)
    assert [ev(e) for e in grads["x"]] == pytest.approx(x.grad.view(-1).tolist(), rel=1e-9, abs=1e-12)


def test_bn_train_input_gradient_equals_textbook_form(bn):
    textbook = th.bn_train_input_gradient_textbook(bn)
    for derived, closed in zip(bn.train["x"], textbook):
        assert sp.simplify(derived - closed) == 0


def test_which_gradients_need_the_input(bn):
    """Eq. (2): the scale gradient reads x, the shift gradient does not; eval-mode dL/dx neither."""
    xs = set(bn.xs)
    assert bn.eval["gamma"].free_symbols & xs
    assert not bn.eval["beta"].free_symbols & xs
    assert not bn.train["beta"].free_symbols & xs
    for e in bn.eval["x"]:
        assert not e.free_symbols & xs
    assert sp.simplify(sum(bn.train["x"])) == 0  # train mode: input gradients sum to zero


def test_bn_gradients_rejects_a_batch_of_one():
    with pytest.raises(ValueError, match="m=1"):
        th.bn_gradients(1)


# ---------------------------------------------------------------- Theorem 1

def test_closed_form_equals_finite_sum_for_symbolic_L():
    summed = th.geometric_sum().doit()
    assert isinstance(summed, sp.Piecewise)
    (ratio_one, cond_one), (general, _) = summed.args
    assert cond_one == sp.Eq(th.q, 1) and ratio_one == th.L
    assert sp.simplify(general - th.geometric_closed_form()) == 0
    assert sp.limit(th.geometric_closed_form(), th.q, 1) == th.L


@pytest.mark.parametrize("layers", [1, 2, 5, 9])
@pytest.mark.parametrize("ratio", [sp.Rational(1, 3), sp.Rational(3, 2), 7])
def test_closed_form_equals_explicit_sum(layers, ratio):
    assert th.geometric_closed_form(ratio, layers) == sum(ratio ** k for k in range(1, layers + 1))


@given(lam=st.floats(1e-4, 1), M=st.floats(0.1, 10), T=st.integers(1, 200), G=st.floats(0.01, 3),
       N=st.integers(1, 64), L=st.integers(1, 8))
@settings(max_examples=80, deadline=None)
def test_numeric_bound_matches_symbolic_and_brute_force(lam, M, T, G, N, L):
    value = th.theorem1_bound(lam, M, T, G, N, L)
    psi, psi_t = 1.5 * math.sqrt(N) * G, math.sqrt(N) * G
    brute = lam * M * T * G * sum(psi ** k + psi_t ** k for k in range(1, L + 1))
    assert value == pytest.approx(brute, rel=1e-9)
    assert th.theorem1_log10_bound(lam, M, T, G, N, L) == pytest.approx(math.log10(brute), abs=1e-9)


def test_ratio_one_is_the_limit():
    # sqrt(N) G = 1 makes Psi~ = 1: the geometric sum is then L
    assert th.theorem1_bound(1, 1, 1, 0.5, 4, 3) == pytest.approx(0.5 * (1.5 + 1.5 ** 2 + 1.5 ** 3 + 3))
    # Psi = 1 exactly (up to float rounding): no 0/0, and the value is continuous around it
    at_one = th.theorem1_log10_bound(0.05, 1, 100, 2 / (3 * 4), 16, 4)
    assert at_one == pytest.approx(math.log10(0.05 * 100 * (2 / 12) * (4 + sum((2 / 3) ** k for k in range(1, 5)))))
    near = th.theorem1_log10_bound(0.05, 1, 100, 2 / (3 * 4) * (1 + 1e-9), 16, 4)
    assert near == pytest.approx(at_one, abs=1e-7)


def test_bound_is_increasing_in_T_L_N_G():
    lam, M, T, G, N = sp.symbols("lambda M T G N", positive=True)
    bound = th.theorem1_bound(lam, M, T, G, N, th.L)
    assert sp.simplify(sp.diff(bound, T) - bound / T) == 0          # linear in T
    step = th.theorem1_bound(lam, M, T, G, N, th.L + 1) - bound     # L -> L + 1 adds a positive term
    psi, psi_t = th.psi(N, G)
    assert sp.simplify(step - lam * M * T * G * (psi ** (th.L + 1) + psi_t ** (th.L + 1))) == 0
    root_n = sp.Symbol("s", positive=True)                          # s = sqrt(N)
    for layers in (1, 2, 3, 4):                                     # a polynomial with positive terms
        fixed_l = th.theorem1_bound(lam, M, T, G, root_n ** 2, layers)
        poly = sp.Poly(sp.cancel(fixed_l), G, root_n)
        assert all(c.is_positive for c in poly.coeffs())


def test_bound_overflow_is_inf_and_log10_stays_finite():
    assert th.theorem1_bound(0.1, 1, 10, 10, 1e6, 400) == math.inf
    assert 1000 < th.theorem1_log10_bound(0.1, 1, 10, 10, 1e6, 400) < 2000


# ---------------------------------------------------------------- Theorem 1, measured (chapter 5)

def test_twins_with_the_same_backward_never_drift():
    """The twin harness itself: one start, one batch order, so identical backwards stay equal."""
    task = th.twin_task(steps=10)
    records = th.twin_training(2, task, lr=0.05, checkpoints=(1, 10), approximated=F.hardswish)
    assert [r["distance"] for r in records] == [0.0, 0.0]
    assert [r["weight_distance"] for r in records] == [0.0, 0.0]


def test_twin_training_drifts_and_the_lemma_holds_at_every_step():
    task = th.twin_task(steps=10)
    records = th.twin_training(3, task, lr=0.05, checkpoints=(1, 10))
    assert 0 < records[0]["distance"] and 0 < records[1]["weight_distance"]
    for r in records:
        # the lemma with the paper's Psi, and the sharper spectral version, at every step so far
        assert 0 < r["lemma_ratio"] <= r["lemma_ratio_spectral"] <= 1
        # G bounds the three quantities it stands for; Theorem 1's bound then exceeds the drift
        assert r["G"] == max(r["G_parts"])
        assert th.theorem1_bound(0.05, r["M"], r["T"], r["G"], 16, 3) > r["distance"]

