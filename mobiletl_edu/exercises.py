"""Immediate feedback on the book's exercises: ``check("ex-...", answer)``.

Each checkable exercise of the book (its ``:label:`` in ``book/*.md``) has a checker here. A
checker takes the reader's answer, compares it with the truth computed by the package itself
(the profiler, the measured saved tensors, ``theory``, ``quant``, ``experiments``) or by an
independent library (torch's autograd, scipy), and answers right, or wrong with a hint that
names the kind of mistake (a missing factor of the batch size, bits instead of bytes, a sign)
without giving the solution away.

* symbolic answers are sympy expressions, compared by equivalence (``sympy.simplify`` of the
  difference, backed by evaluation at random points), never as strings;
* numbers are compared with a tolerance;
* code (a function the reader wrote) runs against hidden cases: hypothesis property tests, or
  random shapes checked against the profiler and the saved-tensor measurement.

``expects(id)`` says what to hand in, ``symbols(id)`` gives the sympy symbols a formula may use.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import random
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import sympy as sp
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Feedback", "check", "expects", "symbols", "EXERCISES"]


@dataclass(frozen=True)
class Feedback:
    """The verdict on one answer: ``correct``, and a message (a hint when it is wrong)."""

    exercise: str
    correct: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        return f"{self.exercise}: {'right' if self.correct else 'not yet'}. {self.message}".rstrip()

    __repr__ = __str__


@dataclass(frozen=True)
class Exercise:
    label: str  # the exercise's :label: in the book
    chapter: str  # the page it is on, e.g. "book/02_irb_memory"
    expects: str  # what to hand in, in words
    grade: Callable[[Any], None]  # raises _Wrong(hint) or TypeError; returns when right
    symbols: tuple[str, ...] = ()  # names of the sympy symbols a formula may use


class _Wrong(Exception):
    """A wrong answer; the message is the hint."""


EXERCISES: dict[str, Exercise] = {}


def _exercise(label: str, chapter: str, expects: str, symbols: str = ""):
    def register(grade):
        EXERCISES[label] = Exercise(label, chapter, expects, grade, tuple(symbols.split()))
        return grade
    return register


def _lookup(exercise_id: str) -> Exercise:
    if exercise_id not in EXERCISES:
        close = difflib.get_close_matches(str(exercise_id), EXERCISES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown exercise {exercise_id!r}{hint}; checkable exercises: {', '.join(EXERCISES)}")
    return EXERCISES[exercise_id]


def expects(exercise_id: str) -> str:
    """What ``check(exercise_id, answer)`` wants as ``answer``."""
    return _lookup(exercise_id).expects


def symbols(exercise_id: str) -> SimpleNamespace:
    """The sympy symbols a formula for ``exercise_id`` may use, as attributes (``S.B``, ``S.C_in``)."""
    exercise = _lookup(exercise_id)
    if not exercise.symbols:
        raise ValueError(f"{exercise_id} takes no formula in symbols; it expects {exercise.expects}")
    return SimpleNamespace(**{name: _SYMBOLS[name] for name in exercise.symbols})


def check(exercise_id: str, answer: Any) -> Feedback:
    """Right, or wrong with a hint. An unknown id raises ValueError, an answer of the wrong type TypeError."""
    exercise = _lookup(exercise_id)
    if answer is Ellipsis:
        return Feedback(exercise_id, False, f"No answer yet: replace the ... with {exercise.expects}.")
    try:
        exercise.grade(answer)
    except _Wrong as wrong:
        return Feedback(exercise_id, False, f"Hint: {wrong}")
    return Feedback(exercise_id, True, "Well done.")


# ---------------------------------------------------------------------------------------------
# Reading answers


def _type_error(label: str, answer: Any) -> TypeError:
    return TypeError(f"{label} expects {EXERCISES[label].expects}; got {type(answer).__name__} {answer!r:.80}")


def _number(label: str, answer: Any) -> float:
    if isinstance(answer, (torch.Tensor, np.ndarray, np.generic)) and np.size(answer) == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, (int, float, sp.Number)):
        raise _type_error(label, answer)
    value = float(answer)
    if math.isnan(value):
        raise _type_error(label, answer)
    return value


def _integer(label: str, answer: Any) -> int:
    value = _number(label, answer)
    if value != int(value):
        raise _type_error(label, answer)
    return int(value)


def _mapping(label: str, answer: Any, keys: tuple[str, ...]) -> dict:
    if not isinstance(answer, dict) or set(answer) != set(keys):
        raise _type_error(label, answer)
    return answer


def _expression(label: str, answer: Any) -> sp.Expr:
    """A sympy expression whose symbols are matched by name with the exercise's symbols."""
    if isinstance(answer, str) or not isinstance(answer, (sp.Expr, int, float, sp.Number)) or isinstance(answer, bool):
        raise _type_error(label, answer)
    expr = sp.sympify(answer)
    allowed = EXERCISES[label].symbols
    unknown = sorted(s.name for s in expr.free_symbols if s.name not in allowed)
    if unknown:
        names = ", ".join(allowed) or "none"
        raise TypeError(f"{label}: unknown symbol(s) {', '.join(unknown)}; use {names} "
                        f"(exercises.symbols({label!r}) gives them)")
    return expr.subs({s: _SYMBOLS[s.name] for s in expr.free_symbols})


def _function(label: str, answer: Any) -> Callable:
    if not callable(answer):
        raise _type_error(label, answer)
    return answer


def _call(fn: Callable, *args):
    """Run the reader's function; an exception it raises becomes the feedback."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - any failure of the reader's code is feedback
        raise _Wrong(f"your function raised {type(error).__name__}: {error}") from None


def _close(a: float, b: float, rel: float = 1e-6, abs_: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _numbers(label: str, answer: Any, truth: dict[str, float], hints: Callable[[str], dict[float, str]],
             fallback: str, rel: float = 1e-6) -> None:
    """A dict of numbers against ``truth``; a wrong one gets the hint of its factor (answer / truth)."""
    for key, value in _mapping(label, answer, tuple(truth)).items():
        value = _number(label, value)
        if not _close(value, truth[key], rel):
            raise _Wrong(f"{key}: " + (_factor_hint(value / truth[key], hints(key), min(rel, 1e-3)) or fallback))


def _factor_hint(ratio: float, factors: dict[float, str], rel: float = 1e-3) -> str | None:
    """The hint for the known mistake whose factor (answer / truth) is ``ratio``, if any."""
    for factor, hint in factors.items():
        if ratio != 0 and _close(ratio, factor, rel):
            return hint
    return None


# Units: the factor by which a wrong answer differs from the right one (answer / truth).
BITS = {8.0: "that looks like bits; the exercise asks for bytes (8 bits each)",
        1 / 8: "that looks like bytes where bits were asked (or a division by 8 too many)"}
MEGA = {1e-6: "that looks like megabytes; the exercise asks for bytes",
        1e6: "a factor of a million too large: bytes where megabytes were asked?"}
PERCENT = {100.0: "that looks like a percentage; give a fraction between 0 and 1",
           0.01: "that looks like a fraction; give a percentage"}


# ---------------------------------------------------------------------------------------------
# Formulas: symbols, equivalence, and where a wrong formula goes wrong

_SYMBOLS = {
    **{n: sp.Symbol(n, integer=True, positive=True) for n in ("B", "C", "H", "W", "C_in", "C_out", "H_out",
                                                              "W_out", "k", "g", "n", "c", "n1", "n2", "N", "L")},
    **{n: sp.Symbol(n, positive=True) for n in ("r", "G", "s1", "s2")},
}
_MEANING = {"B": "the batch size B", "C": "the channels C", "H": "the height H", "W": "the width W",
            "C_in": "the input channels C_in", "C_out": "the output channels C_out",
            "H_out": "the output height H_out", "W_out": "the output width W_out",
            "k": "the kernel size k", "g": "the number of groups g", "n": "the weights n",
            "c": "the output channels c", "N": "the width N", "L": "the number of layers L"}


def _same_expression(a: sp.Expr, b: sp.Expr) -> bool:
    """sympy equivalence: the difference simplifies to 0, or vanishes at random points (60 digits)."""
    difference = a - b
    if sp.simplify(difference) == 0:
        return True
    rng = random.Random(0)
    free = sorted(difference.free_symbols, key=str)
    for _ in range(6):
        point = {s: rng.randint(2, 40) if s.is_integer else sp.Rational(rng.randint(1, 400), rng.randint(1, 40))
                 for s in free}
        value_a, value_b = (sp.N(e.subs(point), 60) for e in (a, b))
        if not (value_a.is_number and value_b.is_number):
            return False
        if abs(value_a - value_b) > 1e-40 * max(1, abs(value_b)):
            return False
    return True


def _evaluate(expr: sp.Expr, point: dict[str, float]) -> float:
    value = expr.subs({_SYMBOLS[name]: v for name, v in point.items()})
    if value.free_symbols:
        raise _Wrong(f"your formula still depends on {', '.join(sorted(map(str, value.free_symbols)))}, "
                     "which the answer does not need")
    return float(value)


def _scaling_hint(answer_at, truth_at, base: dict, moves: dict[str, dict]) -> str | None:
    """Name the variable the answer scales with wrongly: the ratio answer/truth, as that variable
    alone changes, grows like ``variable ** a`` with a whole ``a`` (a = -1: a missing factor)."""
    ratio0 = answer_at(base) / truth_at(base)
    for name, moved in moves.items():
        ratio1 = answer_at(moved) / truth_at(moved)
        if ratio0 <= 0 or ratio1 <= 0:
            continue
        power = math.log(ratio1 / ratio0) / math.log(moved[name] / base[name])
        if abs(power) > 0.05 and abs(power - round(power)) < 1e-6:
            a, what = round(power), _MEANING.get(name, name)
            exponent = "" if abs(a) == 1 else f" to the power {abs(a)}"
            return f"{'a missing' if a < 0 else 'an extra'} factor of {what}{exponent}"
    return None


def _check_formula(expr: sp.Expr, truth_at: Callable[[dict], float], points: list[dict], moves: dict,
                   factors: dict[float, str] | None = None) -> None:
    """A formula against the truth at the given points; on a mismatch, the most specific hint."""
    answers = [_evaluate(expr, p) for p in points]
    truths = [truth_at(p) for p in points]
    if all(_close(a, t, 1e-9) for a, t in zip(answers, truths)):
        return
    ratios = [a / t if t else math.inf for a, t in zip(answers, truths)]
    if all(_close(r, ratios[0], 1e-9) for r in ratios):
        hint = _factor_hint(ratios[0], factors or {})
        if hint:
            raise _Wrong(hint)
        raise _Wrong("your formula is off by the same factor everywhere: check the units and constant factors")
    hint = _scaling_hint(lambda p: _evaluate(expr, p), truth_at, points[0], moves(points[0]))
    if hint:
        raise _Wrong(hint)
    raise _Wrong("your formula disagrees with the package's count on some shapes; compare it term by term")


# ---------------------------------------------------------------------------------------------
# Chapter 1: on-device training


@functools.lru_cache(maxsize=None)
def _conv_macs_at(point: tuple) -> dict[str, int]:
    from .profiler import profile
    p = dict(point)
    conv = nn.Conv2d(p["C_in"], p["C_out"], p["k"], padding=p["k"] // 2, groups=p["g"], bias=False)
    profiled = profile(nn.Sequential(conv), (p["B"], p["C_in"], p["H_out"], p["W_out"]), loss=False,
                       input_requires_grad=True)
    (layer,), per_mac = profiled.layers, profiled.convention.flops_per_mac
    return {"forward": layer.forward_flops // per_mac, "input_gradient": layer.backward_input_flops // per_mac,
            "weight_gradient": layer.backward_weight_flops // per_mac}


def _conv_macs(point: dict, key: str) -> int:
    """MACs of one stride-1 convolution as the profiler counts them (forward, input or weight gradient)."""
    return _conv_macs_at(tuple(sorted(point.items())))[key]


def _conv_points() -> list[dict]:
    rng = random.Random(12)
    points = []
    for _ in range(5):
        g = rng.choice([1, 2, 3])
        points.append({"B": rng.randint(1, 4), "g": g, "C_in": g * rng.randint(1, 4), "C_out": g * rng.randint(1, 4),
                       "H_out": rng.randint(3, 9), "W_out": rng.randint(3, 9), "k": rng.choice([1, 3, 5])})
    return points


def _conv_moves(p: dict) -> dict[str, dict]:
    """One variable changed at a time (the groups with both channel counts, to stay divisible)."""
    moves = {name: {**p, name: 2 * p[name]} for name in ("B", "C_in", "C_out", "H_out", "W_out")}
    moves["k"] = {**p, "k": p["k"] + 2}
    moves["g"] = {**p, "g": 2 * p["g"], "C_in": 2 * p["C_in"], "C_out": 2 * p["C_out"]}
    return moves


@_exercise("ex-od-backward", "book/01_on_device",
           "a dict {'forward': ..., 'input_gradient': ..., 'weight_gradient': ...} of sympy expressions: "
           "the multiply-accumulates (MACs) of each, in B, C_in, C_out, H_out, W_out, k, g",
           "B C_in C_out H_out W_out k g")
def _od_backward(answer):
    label = "ex-od-backward"
    for key, value in _mapping(label, answer, ("forward", "input_gradient", "weight_gradient")).items():
        try:
            _check_formula(_expression(label, value), functools.partial(_conv_macs, key=key), _conv_points(),
                           _conv_moves, {2.0: "that counts FLOPs (a MAC is one multiply and one add); give MACs"})
        except _Wrong as wrong:
            note = " (a grouped convolution's filter sees C_in / g input channels)" if "groups" in str(wrong) else ""
            raise _Wrong(f"{key.replace('_', ' ')}: {wrong}{note}") from None


@functools.lru_cache(maxsize=None)
def _ft_all_profile(model: str, convention: str = "pytorch"):
    from .profiler import profile_model
    return profile_model(model, "ft-all", batch=8, resolution=224, classes=10, convention=convention)


@_exercise("ex-od-networks", "book/01_on_device",
           "a dict {'mobilenet_v2': ratio, 'mobilenet_v3_large': ratio}: stored activations divided by the "
           "float32 parameter bytes, FT-All, batch 8, 224x224, 10 classes, convention 'pytorch'")
def _od_networks(answer):
    def ratio(model, convention="pytorch"):
        p = _ft_all_profile(model, convention)
        return p.activation_bytes / p.param_bytes

    truth = {model: ratio(model) for model in ("mobilenet_v2", "mobilenet_v3_large")}
    _numbers("ex-od-networks", answer, truth, lambda model: {
        1 / truth[model] ** 2: "you divided the parameters by the activations; the question is the other way round",
        4.0: "that divides by the parameter count; a float32 parameter takes 4 bytes",
        ratio(model, "paper") / truth[model]: "that is the 'paper' convention; the exercise asks for 'pytorch'",
        1e-6: "activations in MB divided by parameters in bytes? use one unit for both"},
        "compare profile_model(...).activation_bytes with .param_bytes", rel=0.01)


@functools.lru_cache(maxsize=None)
def _stored_bytes(model: str, method: str, blocks: int | None, batch: int) -> int:
    from .profiler import profile_model
    return profile_model(model, method, blocks, batch=batch, resolution=224, classes=10).activation_bytes


def _largest_batch(method: str, blocks: int | None, budget: float) -> int:
    per_sample = _stored_bytes("mobilenet_v3_small", method, blocks, 1)
    batch = max(1, int(budget // per_sample))
    while batch > 1 and _stored_bytes("mobilenet_v3_small", method, blocks, batch) > budget:
        batch -= 1
    while _stored_bytes("mobilenet_v3_small", method, blocks, batch + 1) <= budget:
        batch += 1
    return batch


@_exercise("ex-od-scaling", "book/01_on_device",
           "a dict {'ft-all': batch, 'ft-blocks': batch}: the largest batch whose stored activations fit in "
           "64 MB (10**6 bytes each) for MobileNetV3-Small at 224x224 (ft-blocks: 3 blocks)")
def _od_scaling(answer):
    label = "ex-od-scaling"
    for method, value in _mapping(label, answer, ("ft-all", "ft-blocks")).items():
        value = _integer(label, value)
        blocks = 3 if method == "ft-blocks" else None
        truth = _largest_batch(method, blocks, 64e6)
        if value == truth:
            continue
        if value == truth + 1:
            raise _Wrong(f"{method}: one too many: that batch no longer fits in 64 MB (64 x 10**6 bytes here, "
                         "not 64 MiB); round down")
        if value == _largest_batch(method, blocks, 64 * 2**20):
            raise _Wrong(f"{method}: that budget is 64 MiB (2**20 bytes each); the exercise uses MB = 10**6 bytes")
        if value == truth - 1:
            raise _Wrong(f"{method}: one too few: the stored activations are not exactly proportional to the batch "
                         "(some, such as per-channel statistics, do not grow with it); profile the next batch up")
        if value <= max(1, truth // 4):
            raise _Wrong(f"{method}: far too small: divide the budget by the stored activations of one sample, "
                         "not of the batch of 8")
        raise _Wrong(f"{method}: the stored activations grow in proportion to the batch: "
                     "divide the budget by the bytes of one sample")


# ---------------------------------------------------------------------------------------------
# Chapter 2: the inverted residual block


def _saving(kind: str, storage: str, relu6_bits=2) -> sp.Expr:
    from . import theory as th
    vanilla = th.block_stored_bytes(kind, "ft-blocks", storage, relu6_bits)
    return 1 - th.block_stored_bytes(kind, "mobiletl", storage, relu6_bits) / vanilla


@functools.lru_cache(maxsize=None)
def _irb_limits() -> tuple[sp.Expr, sp.Expr]:
    """The saving's limit for e -> oo: MobileNetV2 as a function of r, MobileNetV3 for large maps."""
    from . import theory as th
    r = _SYMBOLS["r"]
    v2 = sp.simplify(sp.limit(_saving("mbv2", "paper", r), th.e, sp.oo))
    v3 = sp.limit(sp.limit(sp.simplify(_saving("mbv3", "paper").subs(th.s, th.e * th.C / 4)), th.e, sp.oo), th.H, sp.oo)
    return v2, v3


@_exercise("ex-irb-limit", "book/02_irb_memory",
           "a dict {'mbv2': expression in r, 'mbv3': number}: the limit of MobileTL's saving (a fraction, "
           "paper accounting) as e grows without bound; for MobileNetV3 also for large maps", "r")
def _irb_limit(answer):
    label = "ex-irb-limit"
    parts = _mapping(label, answer, ("mbv2", "mbv3"))
    v2, v3 = _irb_limits()
    r = _SYMBOLS["r"]
    for key, truth in (("mbv2", v2), ("mbv3", v3)):
        expr = _expression(label, parts[key])
        if _same_expression(expr, truth):
            continue
        if _same_expression(expr, 100 * truth):
            raise _Wrong(f"{key}: that is a percentage; give the saving as a fraction")
        if _same_expression(expr, 1 - truth):
            raise _Wrong(f"{key}: that is the fraction MobileTL keeps, not the fraction it saves")
        if key == "mbv2" and r not in expr.free_symbols:
            raise _Wrong("mbv2: the limit depends on r: the vanilla block keeps r-bit ReLU6 masks on the expanded map")
        if key == "mbv2" and _same_expression(expr.subs(r, 2), truth.subs(r, 2)):
            raise _Wrong("mbv2: right at r = 2, but not as a function of r: count the r-bit masks again")
        raise _Wrong(f"{key}: keep only the terms on the expanded map (those proportional to e) in both totals")


@functools.lru_cache(maxsize=None)
def _three_ways(method: str, convention: str) -> int:
    from .profiler import profile_block
    return profile_block("mbv3", method, (4, 40, 14, 14), expansion=3, kernel=3,
                         convention=convention).activation_bytes


@_exercise("ex-irb-three-ways", "book/02_irb_memory",
           "a dict {'ft-blocks': bytes, 'mobiletl': bytes}: the stored activations, in bytes, of the MobileNetV3 "
           "block (C = 40, e = 3, k = 3, input 4x40x14x14) as PyTorch keeps them")
def _irb_three_ways(answer):
    truth = {method: _three_ways(method, "pytorch") for method in ("ft-blocks", "mobiletl")}
    _numbers("ex-irb-three-ways", answer, truth, lambda method: {
        **BITS, **MEGA, 1 / 4: "a missing factor of the batch size (4 here)",
        _three_ways(method, "paper") / truth[method]:
            "that is the paper's accounting; the exercise asks what PyTorch keeps (storage='pytorch')"},
        "the formula, profile_block and saved_activations all agree: compare yours with one of them", rel=1e-9)


@functools.lru_cache(maxsize=None)
def _expansion_savings(storage: str) -> tuple[float, ...]:
    from . import theory as th
    saving = _saving("mbv2", storage)
    return tuple(float(100 * saving.subs({th.B: 8, th.C: 32, th.H: 14, th.W: 14, th.e: e, th.k: 3}))
                 for e in range(1, 9))


@_exercise("ex-irb-expansion", "book/02_irb_memory",
           "a list of 8 numbers: the measured saving of MobileTL, in percent, for the MobileNetV2 block "
           "(C = 32, input 8x32x14x14) at e = 1, ..., 8")
def _irb_expansion(answer):
    label = "ex-irb-expansion"
    if isinstance(answer, (str, bytes, dict)) or not hasattr(answer, "__len__") or len(answer) != 8:
        raise _type_error(label, answer)
    values = [_number(label, v) for v in answer]
    truth = _expansion_savings("pytorch")
    if all(_close(v, t, 0, 0.05) for v, t in zip(values, truth)):
        return
    if all(_close(v, t, 0, 0.05) for v, t in zip(values, _expansion_savings("paper"))):
        raise _Wrong("those follow the paper's accounting (2-bit ReLU6 masks); the measurement sees what "
                     "PyTorch keeps")
    if all(_close(100 * v, t, 0, 0.05) for v, t in zip(values, truth)):
        raise _Wrong("those are fractions; give percentages")
    if all(_close(100 - v, t, 0, 0.05) for v, t in zip(values, truth)):
        raise _Wrong("that is the share MobileTL keeps, not the share it saves")
    wrong = [e for e, (v, t) in enumerate(zip(values, truth), 1) if not _close(v, t, 0, 0.05)]
    raise _Wrong(f"wrong at e = {', '.join(map(str, wrong))}: measure a fresh block for every e and method, "
                 "with an input that requires grad")


# ---------------------------------------------------------------------------------------------
# Chapter 3: BatchNorm


def _property(test, strategies: tuple, examples: int) -> None:
    """Run ``test(*drawn)`` on hypothesis examples; it returns a hint when the reader's code is wrong.

    The first failing example's hint becomes the feedback (no shrinking: the hint names the kind of
    mistake, not the example).
    """
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st

    hints = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
    @given(st.tuples(*strategies))
    def run(drawn):
        try:
            hint = test(*drawn)
        except _Wrong as wrong:
            hint = str(wrong)
        if hint:
            hints.append(hint)
            raise AssertionError(hint)

    try:
        run()
    except AssertionError:
        raise _Wrong(hints[-1]) from None


@_exercise("ex-bn-identities", "book/03_batchnorm",
           "a function bn_input_gradient(x, g, gamma, eps) -> tensor: the training-mode BN input gradient "
           "dL/dx of one channel, for inputs x and upstream gradients g (1-D float64 tensors)")
def _bn_identities(answer):
    from hypothesis import strategies as st
    fn = _function("ex-bn-identities", answer)
    finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
    batches = st.integers(2, 12).flatmap(lambda m: st.tuples(*[st.lists(finite, min_size=m, max_size=m)] * 2))

    def matches_autograd(xg, gamma, eps):
        x, g = (torch.tensor(v, dtype=torch.float64) for v in xg)
        leaf = x.clone().requires_grad_(True)
        F.batch_norm(leaf.view(-1, 1), None, None, torch.tensor([gamma], dtype=torch.float64), None,
                     training=True, eps=eps).view(-1).backward(g)
        truth = leaf.grad
        theirs = torch.as_tensor(_call(fn, x.clone(), g.clone(), gamma, eps), dtype=torch.float64).reshape(-1)
        if theirs.shape != x.shape:
            return "your function returns a tensor of another shape than x"
        size = 1e-6 * (1 + truth.abs().sum().item() + theirs.abs().sum().item())
        if torch.allclose(theirs, truth, rtol=1e-6, atol=size):
            return None
        if abs(theirs.sum().item()) > size:
            return ("your gradient does not sum to zero, so the loss would change when the whole batch shifts: "
                    "the term that removes the mean of g is missing or wrong")
        parallel = torch.linalg.matrix_rank(torch.stack([theirs, truth]), rtol=1e-6).item() < 2
        if parallel and truth.abs().max() > 1e-6:
            return "both identities hold but the values are off by a factor: check the factor in front of the bracket"
        return ("the shift identity holds but the scale identity fails: the term along x-hat is missing or has the "
                "wrong sign")

    _property(matches_autograd, (batches, st.floats(0.1, 3.0), st.sampled_from([1e-5, 1e-3, 0.1])), 40)


@_exercise("ex-bn-frozen", "book/03_batchnorm",
           "a function frozen_batchnorm(bn) -> nn.Module that turns an nn.BatchNorm2d into a fully frozen one "
           "(statistics, scale and shift frozen; the input still gets a gradient)")
def _bn_frozen(answer):
    from .measure import saved_activations
    fn = _function("ex-bn-frozen", answer)
    rng = torch.Generator().manual_seed(3)
    for channels, side in ((16, 8), (5, 3)):
        source = nn.BatchNorm2d(channels)
        with torch.no_grad():
            source.weight.uniform_(0.5, 1.5, generator=rng)
            source.bias.normal_(generator=rng)
            source.running_mean.normal_(generator=rng)
            source.running_var.uniform_(0.5, 2.0, generator=rng)
        reference = nn.BatchNorm2d(channels).eval()
        reference.load_state_dict(source.state_dict())
        frozen = _call(fn, source)
        if not isinstance(frozen, nn.Module):
            raise _type_error("ex-bn-frozen", frozen)
        x = torch.randn(2, channels, side, side, generator=rng, requires_grad=True)
        _call(lambda: frozen(x).sum().backward())
        trained = [name for name, p in frozen.named_parameters() if p.requires_grad]
        if trained:
            raise _Wrong(f"{', '.join(trained)} still train(s): a fully frozen BN trains nothing")
        if x.grad is None:
            raise _Wrong("the input receives no gradient: the layers below could not train")
        probe = torch.randn(2, channels, side, side, generator=rng)
        with torch.no_grad():
            if not torch.allclose(frozen(probe), reference(probe), atol=1e-5):
                raise _Wrong("its output differs from the BN's in evaluation mode: the running statistics, "
                             "scale and shift must stay those of the BN")
        kept = saved_activations(frozen, torch.randn(2, channels, side, side, requires_grad=True)).total_bytes
        if kept != 4 * channels:
            raise _Wrong("it keeps the whole input map for backward; a frozen BN is a per-channel multiply, which "
                         "needs only its per-channel factor")
        restored = nn.BatchNorm2d(channels)
        try:
            restored.load_state_dict(frozen.state_dict())
        except RuntimeError:
            raise _Wrong("its state dict does not load into nn.BatchNorm2d: keep BatchNorm's parameter and "
                         "buffer names") from None


def _bn_points() -> list[dict]:
    rng = random.Random(7)
    return [{"B": rng.randint(1, 4), "C": rng.randint(1, 12), "H": rng.randint(2, 9), "W": rng.randint(2, 9)}
            for _ in range(4)]


def _bn_moves(p: dict) -> dict[str, dict]:
    return {name: {**p, name: 2 * p[name]} for name in ("B", "C", "H", "W")}


def _bn_kept_bytes(kind: str, p: dict) -> int:
    from .measure import saved_activations
    from .ops import ShiftOnlyBatchNorm2d
    bn = nn.BatchNorm2d(p["C"])
    if kind == "eval":
        bn.eval().weight.requires_grad_(False)
    else:
        bn = ShiftOnlyBatchNorm2d(bn)
    x = torch.randn(p["B"], p["C"], p["H"], p["W"], requires_grad=True)
    return saved_activations(bn, x).total_bytes


@_exercise("ex-bn-scaling", "book/03_batchnorm",
           "a dict {'eval': expression, 'shift_only': expression}: the bytes kept for backward by an eval-mode "
           "nn.BatchNorm2d with a frozen scale and by ShiftOnlyBatchNorm2d, in B, C, H, W", "B C H W")
def _bn_scaling(answer):
    label = "ex-bn-scaling"
    for kind, value in _mapping(label, answer, ("eval", "shift_only")).items():
        try:
            _check_formula(_expression(label, value), functools.partial(_bn_kept_bytes, kind), _bn_points(),
                           _bn_moves, {**BITS, 0.25: "that counts numbers; a float32 number takes 4 bytes"})
        except _Wrong as wrong:
            raise _Wrong(f"{kind}: {wrong}") from None


# ---------------------------------------------------------------------------------------------
# Chapter 4: the sign approximation


@functools.lru_cache(maxsize=None)
def _sign_mse_pieces() -> tuple[sp.Expr, ...]:
    """E[e(x)^2] of Hard-Swish's sign approximation under N(0, 1), one term per piece of e(x)."""
    from . import theory as th
    density = sp.exp(-th.x ** 2 / 2) / sp.sqrt(2 * sp.pi)
    return tuple(sp.integrate(piece ** 2 * density, (th.x, where.inf, where.sup))
                 for piece, where in th.pieces(th.approximation_error("hardswish")))


@_exercise("ex-sign-mse", "book/04_sign_approximation",
           "a sympy expression (a closed form, no symbols): E[e(x)^2] of the sign approximation of Hard-Swish "
           "for a standard normal x")
def _sign_mse(answer):
    label = "ex-sign-mse"
    value = _expression(label, answer)
    pieces = [p for p in _sign_mse_pieces() if p != 0]
    truth = sp.Add(*pieces)
    exact = float(truth)
    if _same_expression(value, truth) or (value.is_Float and _close(float(value), exact, 1e-9)):
        return
    if _close(float(value), exact, 0.05):
        raise _Wrong("close, but not exact: a Monte Carlo estimate or a rounded number? integrate each piece "
                     "in closed form")
    if any(_same_expression(value, p) for p in pieces):
        raise _Wrong("that is one piece only: the error is non-zero on both sides of 0")
    if _close(float(value) / exact, math.sqrt(2 * math.pi), 1e-6):
        raise _Wrong("a missing normalisation: the standard normal density carries a factor 1/sqrt(2 pi)")
    raise _Wrong("integrate the square of the error against the standard normal density, piece by piece")


class _Activation(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, inputs):
        return self.fn(inputs)


@_exercise("ex-sign-relu6-exact", "book/04_sign_approximation",
           "a function relu6_one_bit(x) -> tensor: ReLU6 forward, the exact ReLU6 gradient, one bit per element "
           "kept for backward")
def _sign_relu6_exact(answer):
    from hypothesis import strategies as st

    from .measure import saved_activations
    fn = _function("ex-sign-relu6-exact", answer)
    kinks = st.sampled_from([0.0, -0.0, 6.0, 3.0, -1.0, 7.5])
    values = st.lists(st.one_of(kinks, st.floats(-10, 10, allow_nan=False, allow_infinity=False)), min_size=1,
                      max_size=40)

    def same_as_torch(values):
        x = torch.tensor(values, dtype=torch.float64)
        upstream = torch.linspace(0.5, 1.5, len(values), dtype=torch.float64)
        mine, torchs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = _call(fn, mine)
        if not torch.equal(out.detach(), F.relu6(x)):
            return "the forward pass differs from F.relu6"
        _call(out.backward, upstream)
        F.relu6(torchs).backward(upstream)
        if mine.grad is None:
            return "the input receives no gradient"
        bad = [v for v, a, b in zip(values, mine.grad.tolist(), torchs.grad.tolist()) if a != b]
        if bad:
            where = "at the kink x = 0" if 0.0 in bad else "at the kink x = 6" if 6.0 in bad else "inside (0, 6)"
            return (f"the gradient differs from PyTorch's {where}: the exact derivative is 1 strictly inside "
                    "(0, 6) and 0 elsewhere")
        return None

    _property(same_as_torch, (values,), 80)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    kept = saved_activations(_Activation(fn), x).total_bytes
    if kept == x.numel():
        raise _Wrong("it keeps one byte per element (a bool tensor); pack eight mask bits into each byte")
    if kept >= 4 * x.numel():
        raise _Wrong("it keeps the whole float input for backward; keep only the packed mask")
    if kept != x.numel() // 8:
        raise _Wrong(f"it keeps {kept} bytes for {x.numel()} elements, not one bit per element")


# ---------------------------------------------------------------------------------------------
# Chapter 5: Theorem 1


@_exercise("ex-thm-spectral", "book/05_theorem",
           "a dict {'psi': expression in G, 'psi_tilde': expression in G, 'ratio': expression in N and L}: the new "
           "ratios, and the limit for large G of the paper's bound divided by the new one", "G N L")
def _thm_spectral(answer):
    from . import theory as th
    label = "ex-thm-spectral"
    parts = _mapping(label, answer, ("psi", "psi_tilde", "ratio"))
    G, N, L = (_SYMBOLS[n] for n in ("G", "N", "L"))
    for key, truth in zip(("psi", "psi_tilde"), th.psi(sp.Integer(1), G)):
        expr = _expression(label, parts[key])
        if not _same_expression(expr, truth):
            if N in expr.free_symbols:
                raise _Wrong(f"{key}: with the spectral norm no square root of N remains")
            raise _Wrong(f"{key}: bound the diagonal factor by its largest entry "
                         f"({'3/2 for the exact backward' if key == 'psi' else '1 for the approximated one'})")
    ratio = _expression(label, parts["ratio"])
    lam, M, T = sp.symbols("lambda M T", positive=True)
    for layers in (1, 2, 3, 6):
        truth = sp.limit(sp.simplify(th.theorem1_bound(lam, M, T, G, N, layers)
                                     / th.theorem1_bound(lam, M, T, G, 1, layers)), G, sp.oo)
        if not _same_expression(ratio.subs(L, layers), truth):
            if _same_expression(ratio.subs(L, layers), 1 / truth):
                raise _Wrong("ratio: inverted: the paper's bound is the larger one")
            if _same_expression(ratio.subs(L, layers), truth ** 2):
                raise _Wrong("ratio: the two ratios Psi differ by sqrt(N), not N")
            raise _Wrong("ratio: for large G only the top power of Psi in each bound matters")


@_exercise("ex-thm-threshold", "book/05_theorem",
           "a list of the values of G (among 0.05, 2/(3 sqrt(N)), 1 and 10) for which the bound stays below 1 "
           "for every L in {1, 2, 4, 8, 16}")
def _thm_threshold(answer):
    from . import theory as th
    label = "ex-thm-threshold"
    if isinstance(answer, (str, bytes, dict)) or not hasattr(answer, "__iter__"):
        raise _type_error(label, answer)
    candidates = (0.05, 2 / (3 * math.sqrt(16)), 1.0, 10.0)
    chosen = set()
    for value in answer:
        value = _number(label, value)
        match = [c for c in candidates if _close(value, c, 1e-3)]
        if not match:
            raise TypeError(f"{label}: {value} is not one of the four values of G: 0.05, 2/(3 sqrt(16)), 1, 10")
        chosen.add(match[0])
    truth = {g for g in candidates
             if max(th.theorem1_log10_bound(0.05, 1, 100, g, 16, k) for k in (1, 2, 4, 8, 16)) < 0}
    if chosen == truth:
        return
    if candidates[1] in chosen - truth:
        raise _Wrong("at the threshold (Psi = 1) the geometric sum grows linearly with L: tabulate up to L = 16")
    if chosen - truth:
        raise _Wrong("above the threshold the bound grows exponentially with L")
    raise _Wrong("a value that keeps the bound below 1 for every L is missing")


# ---------------------------------------------------------------------------------------------
# Chapter 6: block-wise fine-tuning


def _int8_bytes(p: dict) -> int:
    from .quant import FrozenLayer, frozen_weight_bytes
    # n weights in c output channels: a conv of c filters, n / c weights each
    per_channel = p["n"] // p["c"]
    return frozen_weight_bytes(nn.Sequential(FrozenLayer(nn.Conv2d(per_channel, p["c"], 1, bias=False), "int8")))


def _int8_points() -> list[dict]:
    rng = random.Random(5)
    points = []
    for _ in range(4):
        c = rng.randint(1, 40)
        points.append({"c": c, "n": c * rng.randint(1, 50)})
    return points


@_exercise("ex-bw-int8", "book/06_blockwise",
           "a dict {'bytes': expression, 'saving': expression} in n and c: the bytes of int8 storage with one "
           "float32 scale per channel, and the saving over float32 (float32 bytes / int8 bytes)", "n c")
def _bw_int8(answer):
    label = "ex-bw-int8"
    parts = _mapping(label, answer, ("bytes", "saving"))
    stored = _expression(label, parts["bytes"])
    n, c = _SYMBOLS["n"], _SYMBOLS["c"]
    try:
        _check_formula(stored, _int8_bytes, _int8_points(),
                       lambda p: {"c": {**p, "c": 2 * p["c"], "n": 2 * p["n"]}, "n": {**p, "n": 2 * p["n"]}}, BITS)
    except _Wrong as wrong:
        if _same_expression(stored, n):
            raise _Wrong("bytes: the per-channel scales take memory too") from None
        if _same_expression(stored, n + c):
            raise _Wrong("bytes: a float32 scale takes 4 bytes, not 1") from None
        raise _Wrong(f"bytes: {wrong}") from None
    saving = _expression(label, parts["saving"])
    truth = 4 * n / stored
    if not _same_expression(saving, truth):
        if _same_expression(saving, 1 / truth):
            raise _Wrong("saving: inverted: float32 bytes divided by int8 bytes is the saving")
        raise _Wrong("saving: a float32 weight takes 4 bytes")


@functools.lru_cache(maxsize=None)
def _large_sweep() -> tuple[float, float, int]:
    from .profiler import profile_model
    kw = dict(batch=8, resolution=224, classes=10, convention="paper")
    full = profile_model("mobilenet_v3_large", "ft-all", **kw)
    five = profile_model("mobilenet_v3_large", "mobiletl", 5, **kw)
    k = 1
    while profile_model("mobilenet_v3_large", "mobiletl", k, **kw).activation_bytes <= full.activation_bytes / 2:
        k += 1
    return five.training_flops / full.training_flops, five.activation_bytes / full.activation_bytes, k


@_exercise("ex-bw-large", "book/06_blockwise",
           "a dict {'flops_fraction': x, 'activation_fraction': y, 'smallest_k': K}: MobileNetV3-Large, "
           "MobileTL with 5 blocks as fractions (0 to 1) of FT-All's training FLOPs and stored activations "
           "(convention 'paper'), and the smallest K whose stored activations exceed half of FT-All's")
def _bw_large(answer):
    label = "ex-bw-large"
    parts = _mapping(label, answer, ("flops_fraction", "activation_fraction", "smallest_k"))
    flops, activations, k = _large_sweep()
    for key, truth in (("flops_fraction", flops), ("activation_fraction", activations)):
        value = _number(label, parts[key])
        if not _close(value, truth, 0, 0.002):
            hint = _factor_hint(value / truth, {100.0: PERCENT[100.0]}, 0.01)
            if hint is None and _close(1 - value, truth, 0, 0.002):
                hint = "that is the fraction saved; the question asks what MobileTL-5 costs"
            raise _Wrong(f"{key}: " + (hint or "profile FT-All and MobileTL with 5 blocks in one convention, "
                                               "'paper', and divide"))
    value = _integer(label, parts["smallest_k"])
    if value != k:
        raise _Wrong("smallest_k: " + ("one too high: the block before it already exceeds half" if value == k + 1
                                       else "one too low: that K is still at or below half" if value == k - 1
                                       else "compare each K's stored activations with half of FT-All's"))


@_exercise("ex-bw-fold", "book/06_blockwise",
           "a function fold(q, scale, a) -> (q_new, scale_new): the per-channel int8 integers and scales of the "
           "folded weight a_c W_c, from those of W (q: int8, first dim = channels; scale, a: one per channel)")
def _bw_fold(answer):
    from .quant import quantize_per_channel
    fn = _function("ex-bw-fold", answer)
    rng = torch.Generator().manual_seed(4)
    for shape in ((32, 16, 3, 3), (12, 1, 3, 3), (10, 7)):
        w = torch.randn(shape, generator=rng)
        a = torch.randn(shape[0], generator=rng)
        a[0] = -abs(a[0]) - 0.1  # at least one negative factor
        q, scale = quantize_per_channel(w)
        dequantized = q.to(torch.float32) * scale.view(-1, *([1] * (w.dim() - 1)))
        q_truth, scale_truth = quantize_per_channel(dequantized * a.view(-1, *([1] * (w.dim() - 1))))
        result = _call(fn, q.clone(), scale.clone(), a.clone())
        if not (isinstance(result, tuple) and len(result) == 2):
            raise _type_error("ex-bw-fold", result)
        q_new, scale_new = (torch.as_tensor(t) for t in result)
        if q_new.shape != q.shape or scale_new.numel() != scale.numel():
            raise _Wrong("keep the shapes: the integers have the weight's shape, one scale per output channel")
        scale_new = scale_new.reshape(-1).to(torch.float32)
        if (scale_new < 0).any():
            raise _Wrong("a negative scale: a scale is a largest magnitude over 127, so the sign of a_c must go "
                         "to the integers")
        if not torch.allclose(scale_new, scale_truth, rtol=1e-5):
            raise _Wrong("the scales are off: what is the largest magnitude of a_c W_c?")
        if not torch.equal(q_new.to(torch.int8), q_truth):
            if torch.equal(q_new.to(torch.int8), q):
                raise _Wrong("the integers did not change, but where a_c < 0 the rounded a_c W_c / scale changes sign")
            raise _Wrong("the integers are off: divide a_c W_c by its new scale and round")


# ---------------------------------------------------------------------------------------------
# Chapter 7: end to end


def _welch_truth(p: dict) -> dict[str, float]:
    """Welch's standard error and degrees of freedom, from scipy's unequal-variance t-test."""
    import numpy as np
    from scipy import stats
    rng = np.random.default_rng(int(p["n1"] * 1000 + p["n2"]))
    samples = []
    for n, s in ((p["n1"], p["s1"]), (p["n2"], p["s2"])):
        z = rng.standard_normal(int(n))
        z = (z - z.mean()) / z.std(ddof=1)  # sample standard deviation exactly s
        samples.append(5 + s * z + (1.0 if not samples else 0.0))
    result = stats.ttest_ind(samples[0], samples[1], equal_var=False)
    return {"standard_error": (samples[0].mean() - samples[1].mean()) / float(result.statistic),
            "dof": float(result.df)}


def _welch_points() -> list[dict]:
    rng = random.Random(9)
    return [{"n1": rng.randint(2, 12), "n2": rng.randint(2, 12), "s1": rng.uniform(0.2, 3),
             "s2": rng.uniform(0.2, 3)} for _ in range(5)]


@_exercise("ex-e2e-welch", "book/07_end_to_end",
           "a dict {'standard_error': expression, 'dof': expression} in s1, s2, n1, n2: the standard error of "
           "the difference of the two means and Welch's degrees of freedom", "s1 s2 n1 n2")
def _e2e_welch(answer):
    label = "ex-e2e-welch"
    parts = _mapping(label, answer, ("standard_error", "dof"))
    points = _welch_points()
    truths = [_welch_truth(p) for p in points]
    for key in ("standard_error", "dof"):
        expr = _expression(label, parts[key])
        values = [_evaluate(expr, p) for p in points]
        if all(_close(v, t[key], 1e-6) for v, t in zip(values, truths)):
            continue
        if key == "standard_error" and all(_close(v, t[key] ** 2, 1e-6) for v, t in zip(values, truths)):
            raise _Wrong("standard_error: that is the variance of the difference; take its square root")
        if key == "standard_error":
            raise _Wrong("standard_error: each mean has variance sigma_i^2 / n_i, and the variances of "
                         "independent means add")
        if all(_close(v, _welch_with_n(p), 1e-6) for v, p in zip(values, points)):
            raise _Wrong("dof: the variance of s_i^2 brings n_i - 1 (its degrees of freedom), not n_i")
        if all(_close(v, p["n1"] + p["n2"] - 2, 1e-6) for v, p in zip(values, points)):
            raise _Wrong("dof: n1 + n2 - 2 belongs to the pooled, equal-variance test; Welch's depends on the spreads")
        raise _Wrong("dof: match the mean and variance of s1^2/n1 + s2^2/n2 with those of a scaled chi-square")


def _welch_with_n(p: dict) -> float:
    """The typical slip: Welch's moment matching with n_i where n_i - 1 belongs."""
    a, b = p["s1"] ** 2 / p["n1"], p["s2"] ** 2 / p["n2"]
    return (a + b) ** 2 / (a ** 2 / p["n1"] + b ** 2 / p["n2"])


@functools.lru_cache(maxsize=None)
def _reload_counts() -> dict[str, int]:
    from .methods import describe_layer, prepare
    from .quant import FrozenLayer
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10).model
    kinds = Counter(d for d in map(describe_layer, model.modules()) if d)
    int8 = sum(1 for m in model.modules() if isinstance(m, FrozenLayer) and m.precision == "int8")
    return {"int8 frozen layers": int8, "shift-only BNs": kinds["BN shift-only"],
            "sign activations": sum(v for k, v in kinds.items() if k.endswith("sign (1-bit)"))}


@_exercise("ex-e2e-reload", "book/07_end_to_end",
           "a dict {'int8 frozen layers': n, 'shift-only BNs': n, 'sign activations': n}: what the small grid's "
           "mobiletl model (MobileNetV3-Small, 3 trained blocks) contains")
def _e2e_reload(answer):
    label = "ex-e2e-reload"
    truth = _reload_counts()
    for key, value in _mapping(label, answer, tuple(truth)).items():
        value = _integer(label, value)
        if value != truth[key]:
            extra = {"sign activations": " (squeeze-excitation keeps its exact activations)",
                     "shift-only BNs": " (the BN after each projection stays a full BN)",
                     "int8 frozen layers": " (count linear layers as well as convolutions)"}[key]
            raise _Wrong(f"{key}: {'too many' if value > truth[key] else 'too few'}{extra}")


@_exercise("ex-e2e-pareto", "book/07_end_to_end",
           "a function pareto_sweep(points) -> list of indices: the Pareto front of (memory, accuracy) points "
           "in O(n log n)")
def _e2e_pareto(answer):
    from hypothesis import strategies as st

    from .experiments import pareto_front
    fn = _function("ex-e2e-pareto", answer)

    def same_front(points):
        result = list(_call(fn, list(points)))
        truth = set(pareto_front(points))
        if not all(isinstance(i, int) for i in result):
            return "return the indices of the points, not the points"
        mine = set(result)
        if mine == truth and len(result) == len(mine):
            return None
        if len(result) != len(mine):
            return "an index appears twice"
        if any(points.count(points[i]) > 1 for i in truth ^ mine):
            return "exact duplicates: two copies of a front point dominate nothing, so both stay"
        if any(points[i][0] == points[j][0] for i in mine - truth for j in truth):
            return "ties in memory: among points of equal memory only the most accurate can stay"
        return "a point is dominated when another has no more memory and at least its accuracy, one strictly better"

    _property(same_front, (st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=40),),
              200)


# ---------------------------------------------------------------------------------------------
# Chapter 8: profiling


@functools.lru_cache(maxsize=None)
def _table1_conv():
    from .profiler import profile_block
    return profile_block("conv", "ft-blocks", (8, 96, 7, 7), expansion=1, kernel=5)


@_exercise("ex-prof-flops", "book/08_profiling",
           "a number: the training FLOPs (forward plus backward, in FLOPs) of Table 1's conv block")
def _prof_flops(answer):
    value = _number("ex-prof-flops", answer)
    p = _table1_conv()
    truth = p.training_flops
    if _close(value, truth, 1e-9):
        return
    conv = next(layer for layer in p.layers if layer.rule.startswith("Conv2d"))
    conv_flops = conv.forward_flops + conv.backward_flops
    hint = _factor_hint(value / truth, {1e-6: "that looks like MFLOPs; give FLOPs"}, 1e-3)
    if hint is None and _close(value, 541.67e6, 2e-3):
        hint = "that is the number the paper reports; count with the rule table"
    if hint is None and _close(value, truth - conv_flops / 2, 1e-4):
        hint = "the convolution's FLOPs are short by half: a multiply-accumulate is two FLOPs"
    if hint is None and _close(value, truth - conv_flops / 3, 1e-4):
        hint = "one of the convolution's three passes is missing (forward, input gradient, weight gradient)"
    if hint is None and _close(value, conv_flops, 1e-4):
        hint = "the BN and the ReLU cost FLOPs too"
    raise _Wrong(hint or "sum every layer's forward and backward terms from the rule table")


@functools.lru_cache(maxsize=None)
def _convention_ratios() -> dict[str, float]:
    from .profiler import CONVENTIONS, profile_model
    paper = CONVENTIONS["paper"]
    mine = dataclasses.replace(paper, name="macs-mib", flops_per_mac=1, bytes_per_mb=2**20)
    a, b = (profile_model("mobilenet_v3_small", "ft-all", convention=cv) for cv in (paper, mine))
    return {"forward_flops": b.forward_flops / a.forward_flops,
            "stored_mb": b.mb(b.activation_bytes) / a.mb(a.activation_bytes)}


@_exercise("ex-prof-convention", "book/08_profiling",
           "a dict {'forward_flops': ratio, 'stored_mb': ratio}: your convention's number divided by the 'paper' "
           "convention's, for MobileNetV3-Small FT-All")
def _prof_convention(answer):
    truth = _convention_ratios()
    _numbers("ex-prof-convention", answer, truth, lambda key: {
        1 / truth[key] ** 2: "inverted: your convention's number over the paper's",
        **({0.5 / truth[key]: "not exactly a half: the elementwise layers are not counted in MACs"}
           if key == "forward_flops" else {1 / truth[key]: "the bytes do not change, but a MiB is larger than a MB"})},
        "profile both and divide", rel=1e-3)


@functools.lru_cache(maxsize=None)
def _paper_gap_percent() -> float:
    from .measure import saved_activations
    from .methods import prepare
    from .profiler import profile
    torch.manual_seed(0)
    model = prepare("mobilenet_v2", "ft-all", num_classes=10).model
    shape = (2, 3, 96, 96)
    measured = saved_activations(model, torch.randn(shape), torch.randint(0, 10, (2,))).total_bytes
    return 100 * (profile(model, shape, convention="paper").activation_bytes / measured - 1)


@_exercise("ex-prof-resolution", "book/08_profiling",
           "a dict {'follows': convention name, 'paper_gap': percent}: which convention follows the measurement, "
           "and by how many percent the 'paper' count differs from the measured bytes for MobileNetV2 FT-All at "
           "96x96, batch 2 (negative when it counts less)")
def _prof_resolution(answer):
    from .profiler import CONVENTIONS
    label = "ex-prof-resolution"
    parts = _mapping(label, answer, ("follows", "paper_gap"))
    if parts["follows"] not in CONVENTIONS:
        raise TypeError(f"{label}: 'follows' must be one of {', '.join(CONVENTIONS)}, got {parts['follows']!r}")
    if parts["follows"] != "pytorch":
        raise _Wrong("follows: the convention that matches the measurement is the one written from what eager "
                     "PyTorch keeps")
    value, truth = _number(label, parts["paper_gap"]), _paper_gap_percent()
    if _close(value, truth, 0, 0.1):
        return
    if _close(-value, truth, 0, 0.1):
        raise _Wrong("paper_gap: the sign: the paper convention counts less than PyTorch keeps")
    if _close(100 * value, truth, 0, 0.1):
        raise _Wrong("paper_gap: that is a fraction; give percent")
    raise _Wrong("paper_gap: (paper count / measured - 1) x 100, on the same prepared model and input")
