"""The answer keys of ``mobiletl_edu.exercises``: each accepts a right answer and rejects typical wrong ones.

The right answers here are written the way a reader would write them (a formula typed from the
derivation, the book's own solution code, a measurement instead of the profiler), so that each
check is tested against a route other than the one it uses itself. Every wrong answer must be
rejected with the hint for its kind of mistake, and no hint may give the solution away.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path

import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from mobiletl_edu import exercises as ex
from mobiletl_edu.measure import saved_activations
from mobiletl_edu.ops import ShiftOnlyBatchNorm2d, SignHardswish, SignReLU, SignReLU6, pack_bits, unpack_bits

REPO = Path(__file__).resolve().parents[1]


def book_labels() -> dict[str, str]:
    """Every exercise label in book/*.md, with the page it is on."""
    labels = {}
    for page in sorted((REPO / "book").glob("*.md")):
        for block in re.findall(r"```\{exercise(?:-start)?\}[^\n]*\n((?::[^\n]*\n)*)", page.read_text()):
            found = re.search(r":label:\s*(\S+)", block)
            if found:
                labels[found.group(1)] = f"book/{page.stem}"
    return labels


def test_every_checked_exercise_is_in_the_book():
    labels = book_labels()
    assert len(ex.EXERCISES) >= 20
    missing = sorted(set(ex.EXERCISES) - set(labels))
    assert not missing, f"checked exercises with no :label: in book/*.md: {missing}"
    for label, exercise in ex.EXERCISES.items():
        assert labels[label] == exercise.chapter, label


# --------------------------------------------------------------------------------------------
# right answers, written as a reader would


def S(label):
    return ex.symbols(label)


def conv_macs():
    s = S("ex-od-backward")
    return s.B * s.C_out * s.H_out * s.W_out * s.k**2 * s.C_in / s.g


@functools.lru_cache(maxsize=None)
def od_networks():
    from mobiletl_edu.profiler import profile_model
    ratios = {}
    for name in ("mobilenet_v2", "mobilenet_v3_large"):
        q = profile_model(name, "ft-all", batch=8, resolution=224, classes=10)
        ratios[name] = q.activation_bytes / q.param_bytes
    return ratios


@functools.lru_cache(maxsize=None)
def od_scaling(budget=64e6):
    """The book's solution: the budget over the stored bytes of one sample (exact only if proportional)."""
    from mobiletl_edu.profiler import profile_model
    per_sample = {m: profile_model("mobilenet_v3_small", m, b, batch=1).activation_bytes
                  for m, b in (("ft-all", None), ("ft-blocks", 3))}
    return {m: int(budget // v) for m, v in per_sample.items()}


@functools.lru_cache(maxsize=None)
def exact_batches():
    """The largest batch that fits, found by profiling the batches around the proportional estimate."""
    from mobiletl_edu.profiler import profile_model
    best = {}
    for method, blocks in (("ft-all", None), ("ft-blocks", 3)):
        batch = od_scaling()[method]
        while profile_model("mobilenet_v3_small", method, blocks, batch=batch + 1).activation_bytes <= 64e6:
            batch += 1
        best[method] = batch
    return best


@functools.lru_cache(maxsize=None)
def measured_three_ways():
    from mobiletl_edu.methods import prepare_block
    from mobiletl_edu.profiler import build_block
    out = {}
    for method in ("ft-blocks", "mobiletl"):
        block = prepare_block(build_block("mbv3", 40, 3, 3), method)
        out[method] = saved_activations(block, torch.randn(4, 40, 14, 14, requires_grad=True)).total_bytes
    return out


@functools.lru_cache(maxsize=None)
def measured_expansion():
    from mobiletl_edu.methods import prepare_block
    from mobiletl_edu.profiler import build_block
    savings = []
    for ratio in range(1, 9):
        kept = {m: saved_activations(prepare_block(build_block("mbv2", 32, ratio, 3), m),
                                     torch.randn(8, 32, 14, 14, requires_grad=True)).total_bytes
                for m in ("ft-blocks", "mobiletl")}
        savings.append(100 * (1 - kept["mobiletl"] / kept["ft-blocks"]))
    return savings


def paper_expansion():
    from mobiletl_edu import theory as th
    saving = 1 - th.block_stored_bytes("mbv2", "mobiletl", "paper") / th.block_stored_bytes("mbv2", "ft-blocks", "paper")
    return [float(100 * saving.subs({th.B: 8, th.C: 32, th.H: 14, th.W: 14, th.e: e})) for e in range(1, 9)]


def bn_gradient(x, g, gamma, eps, mean_term=True, xhat_term=True, factor=True):
    """The textbook training-mode BN input gradient, with switches to make typical slips."""
    std = torch.sqrt(x.var(unbiased=False) + eps)
    xhat = (x - x.mean()) / std
    bracket = g - (g.mean() if mean_term else 0) - (xhat * (g * xhat).mean() if xhat_term else 0)
    return (gamma / std if factor else 1.0) * bracket


@functools.lru_cache(maxsize=None)
def mse_pieces():
    """E[e(x)^2] for a standard normal x, with e(x) typed from Table 2: 1[x >= 0] - HardSwish'(x)."""
    x = sp.Symbol("x", real=True)
    density = sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)
    left = sp.integrate((-(2 * x + 3) / 6) ** 2 * density, (x, -3, 0))
    right = sp.integrate((1 - (2 * x + 3) / 6) ** 2 * density, (x, 0, 3))
    return left, right


def relu6_one_bit(keep="packed", strict=True):
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, inputs):
            ctx.shape = inputs.shape
            mask = (inputs > 0) & (inputs < 6) if strict else (inputs >= 0) & (inputs <= 6)
            if keep == "packed":
                ctx.save_for_backward(pack_bits(mask))
            elif keep == "bool":
                ctx.save_for_backward(mask)
            else:
                ctx.save_for_backward(inputs)
            return F.relu6(inputs)

        @staticmethod
        def backward(ctx, grad_out):
            (saved,) = ctx.saved_tensors
            if keep == "packed":
                mask = unpack_bits(saved, ctx.shape)
            elif keep == "bool":
                mask = saved
            else:
                mask = (saved > 0) & (saved < 6)
            return grad_out * mask.to(grad_out.dtype)

    return Fn.apply


@functools.lru_cache(maxsize=None)
def reload_counts():
    from mobiletl_edu import prepare
    from mobiletl_edu.quant import FrozenLayer
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10).model
    mods = list(model.modules())
    return {"int8 frozen layers": sum(isinstance(m, FrozenLayer) and m.precision == "int8" for m in mods),
            "shift-only BNs": sum(isinstance(m, ShiftOnlyBatchNorm2d) and m.bias.requires_grad for m in mods),
            "sign activations": sum(isinstance(m, (SignHardswish, SignReLU6, SignReLU)) for m in mods)}


def pareto_sweep(points, keep_duplicates=True, ties_first=True):
    key = (lambda i: (points[i][0], -points[i][1])) if ties_first else (lambda i: (points[i][0], points[i][1]))
    front, best, last = [], float("-inf"), None
    for i in sorted(range(len(points)), key=key):
        if points[i][1] > best or (keep_duplicates and points[i] == last):
            front.append(i)
            best, last = points[i][1], points[i]
    return front


def table1_conv_flops(macs_as_flops=2):
    n = 8 * 96 * 7 * 7
    conv_macs = 25 * 96 * n
    return 3 * macs_as_flops * conv_macs + (8 + 8 + 3) * n + 2 * n


@functools.lru_cache(maxsize=None)
def convention_ratios():
    from mobiletl_edu.profiler import CONVENTIONS, profile_model
    mine = dataclasses.replace(CONVENTIONS["paper"], name="macs-mib", flops_per_mac=1, bytes_per_mb=2**20)
    a, b = (profile_model("mobilenet_v3_small", "ft-all", convention=cv) for cv in (CONVENTIONS["paper"], mine))
    return {"forward_flops": b.forward_flops / a.forward_flops,
            "stored_mb": b.mb(b.activation_bytes) / a.mb(a.activation_bytes)}


@functools.lru_cache(maxsize=None)
def paper_gap():
    from mobiletl_edu import prepare
    from mobiletl_edu.profiler import profile
    model = prepare("mobilenet_v2", "ft-all", num_classes=10).model
    measured = saved_activations(model, torch.randn(2, 3, 96, 96), torch.randint(0, 10, (2,))).total_bytes
    return 100 * (profile(model, (2, 3, 96, 96), convention="paper").activation_bytes / measured - 1)


@functools.lru_cache(maxsize=None)
def large_fractions():
    from mobiletl_edu.profiler import finetuning_sweep
    large = finetuning_sweep("mobilenet_v3_large", "mobiletl", convention="paper")
    full, five = large["FT-All"], large["FT-5-BLKs"]
    over = next(label for label, q in large.items() if q.activation_bytes > full.activation_bytes / 2)
    return {"flops_fraction": five.training_flops / full.training_flops,
            "activation_fraction": five.activation_bytes / full.activation_bytes,
            "smallest_k": int(over.split("-")[1])}


def welch():
    s = S("ex-e2e-welch")
    a, b = s.s1**2 / s.n1, s.s2**2 / s.n2
    return {"standard_error": sp.sqrt(a + b), "dof": (a + b) ** 2 / (a**2 / (s.n1 - 1) + b**2 / (s.n2 - 1))}


def welch_slip():
    s = S("ex-e2e-welch")
    a, b = s.s1**2 / s.n1, s.s2**2 / s.n2
    return {**welch(), "dof": (a + b) ** 2 / (a**2 / s.n1 + b**2 / s.n2)}


def fold(q, scale, a):
    return (torch.sign(a).view(-1, *[1] * (q.dim() - 1)) * q).to(torch.int8), a.abs() * scale


# label -> (right answer, [(wrong answer, a fragment of the hint it must get), ...]); thunks run lazily
CASES = {
    "ex-od-backward": (
        lambda: dict.fromkeys(("forward", "input_gradient", "weight_gradient"), conv_macs()),
        [(lambda: {**dict.fromkeys(("forward", "input_gradient"), conv_macs()),
                   "weight_gradient": conv_macs() / S("ex-od-backward").B}, "missing factor of the batch size"),
         (lambda: dict.fromkeys(("forward", "input_gradient", "weight_gradient"), conv_macs() * S("ex-od-backward").g),
          "groups"),
         (lambda: dict.fromkeys(("forward", "input_gradient", "weight_gradient"), 2 * conv_macs()), "FLOPs")]),
    "ex-od-networks": (
        od_networks,
        [(lambda: {k: 1 / v for k, v in od_networks().items()}, "other way round"),
         (lambda: {k: 4 * v for k, v in od_networks().items()}, "4 bytes")]),
    "ex-od-scaling": (
        exact_batches,
        [(lambda: {**exact_batches(), "ft-all": od_scaling(64 * 2**20)["ft-all"]}, "MiB"),
         (lambda: {k: v + 1 for k, v in exact_batches().items()}, "one too many"),
         (lambda: {**exact_batches(), "ft-blocks": exact_batches()["ft-blocks"] - 1}, "not exactly proportional"),
         (lambda: {k: max(1, v // 8) for k, v in exact_batches().items()}, "one sample")]),
    "ex-irb-limit": (
        lambda: {"mbv2": 1 - sp.Integer(66) / (128 + 2 * S("ex-irb-limit").r), "mbv3": sp.Rational(9, 16)},
        [(lambda: {"mbv2": 100 - sp.Integer(6600) / (128 + 2 * S("ex-irb-limit").r), "mbv3": sp.Rational(9, 16)},
          "percentage"),
         (lambda: {"mbv2": sp.Integer(66) / (128 + 2 * S("ex-irb-limit").r), "mbv3": sp.Rational(9, 16)}, "keeps"),
         (lambda: {"mbv2": sp.Rational(1, 2), "mbv3": sp.Rational(9, 16)}, "depends on r"),
         (lambda: {"mbv2": 1 - sp.Integer(66) / (128 + 2 * S("ex-irb-limit").r), "mbv3": sp.Rational(7, 16)},
          "mbv3")]),
    "ex-irb-three-ways": (
        measured_three_ways,
        [(lambda: {k: 8 * v for k, v in measured_three_ways().items()}, "bits"),
         (lambda: {m: __import__("mobiletl_edu.profiler", fromlist=["x"]).profile_block(
             "mbv3", m, (4, 40, 14, 14), expansion=3, kernel=3, convention="paper").activation_bytes
             for m in ("ft-blocks", "mobiletl")}, "paper's accounting"),
         (lambda: {k: v / 4 for k, v in measured_three_ways().items()}, "batch size")]),
    "ex-irb-expansion": (
        measured_expansion,
        [(paper_expansion, "paper's accounting"),
         (lambda: [v / 100 for v in measured_expansion()], "fractions")]),
    "ex-bn-identities": (
        lambda: bn_gradient,
        [(lambda: lambda x, g, gamma, eps: bn_gradient(x, g, gamma, eps, mean_term=False), "mean of g"),
         (lambda: lambda x, g, gamma, eps: bn_gradient(x, g, gamma, eps, xhat_term=False), "x-hat"),
         (lambda: lambda x, g, gamma, eps: bn_gradient(x, g, gamma, eps, factor=False), "factor")]),
    "ex-bn-frozen": (
        lambda: lambda bn: ShiftOnlyBatchNorm2d(bn, train_shift=False),
        [(lambda: ShiftOnlyBatchNorm2d, "bias still train"),
         (lambda: lambda bn: bn.eval().requires_grad_(False), "whole input map")]),
    "ex-bn-scaling": (
        lambda: {"eval": 4 * S("ex-bn-scaling").B * S("ex-bn-scaling").C * S("ex-bn-scaling").H
                 * S("ex-bn-scaling").W, "shift_only": 4 * S("ex-bn-scaling").C},
        [(lambda: {"eval": 32 * S("ex-bn-scaling").B * S("ex-bn-scaling").C * S("ex-bn-scaling").H
                   * S("ex-bn-scaling").W, "shift_only": 4 * S("ex-bn-scaling").C}, "bits"),
         (lambda: {"eval": 4 * S("ex-bn-scaling").C * S("ex-bn-scaling").H * S("ex-bn-scaling").W,
                   "shift_only": 4 * S("ex-bn-scaling").C}, "missing factor of the batch size"),
         (lambda: {"eval": 4 * S("ex-bn-scaling").B * S("ex-bn-scaling").C * S("ex-bn-scaling").H
                   * S("ex-bn-scaling").W, "shift_only": 4 * S("ex-bn-scaling").B * S("ex-bn-scaling").C},
          "extra factor of the batch size")]),
    "ex-sign-mse": (
        lambda: sum(mse_pieces()),
        [(lambda: mse_pieces()[1], "one piece"),
         (lambda: sum(mse_pieces()) * sp.sqrt(2 * sp.pi), "normalisation"),
         (lambda: float(sum(mse_pieces())) * 1.01, "not exact")]),
    "ex-sign-relu6-exact": (
        relu6_one_bit,
        [(lambda: relu6_one_bit(strict=False), "kink x = 0"),
         (lambda: relu6_one_bit(keep="bool"), "one byte per element"),
         (lambda: relu6_one_bit(keep="input"), "whole float input")]),
    "ex-thm-spectral": (
        lambda: {"psi": sp.Rational(3, 2) * S("ex-thm-spectral").G, "psi_tilde": S("ex-thm-spectral").G,
                 "ratio": S("ex-thm-spectral").N ** (S("ex-thm-spectral").L / 2)},
        [(lambda: {"psi": sp.Rational(3, 2) * S("ex-thm-spectral").G * sp.sqrt(S("ex-thm-spectral").N),
                   "psi_tilde": S("ex-thm-spectral").G, "ratio": 1}, "no square root"),
         (lambda: {"psi": sp.Rational(3, 2) * S("ex-thm-spectral").G, "psi_tilde": S("ex-thm-spectral").G,
                   "ratio": S("ex-thm-spectral").N ** S("ex-thm-spectral").L}, "sqrt(N), not N"),
         (lambda: {"psi": sp.Rational(3, 2) * S("ex-thm-spectral").G, "psi_tilde": S("ex-thm-spectral").G,
                   "ratio": S("ex-thm-spectral").N ** (-S("ex-thm-spectral").L / 2)}, "inverted")]),
    "ex-thm-threshold": (
        lambda: [0.05],
        [(lambda: [0.05, 2 / (3 * math.sqrt(16))], "linearly"),
         (lambda: [0.05, 10], "exponentially"),
         (lambda: [], "missing")]),
    "ex-bw-int8": (
        lambda: {"bytes": S("ex-bw-int8").n + 4 * S("ex-bw-int8").c,
                 "saving": 4 * S("ex-bw-int8").n / (S("ex-bw-int8").n + 4 * S("ex-bw-int8").c)},
        [(lambda: {"bytes": S("ex-bw-int8").n + S("ex-bw-int8").c, "saving": 1}, "4 bytes, not 1"),
         (lambda: {"bytes": S("ex-bw-int8").n, "saving": 4}, "scales take memory"),
         (lambda: {"bytes": 8 * (S("ex-bw-int8").n + 4 * S("ex-bw-int8").c), "saving": 1}, "bits"),
         (lambda: {"bytes": S("ex-bw-int8").n + 4 * S("ex-bw-int8").c,
                   "saving": (S("ex-bw-int8").n + 4 * S("ex-bw-int8").c) / (4 * S("ex-bw-int8").n)}, "inverted")]),
    "ex-bw-large": (
        large_fractions,
        [(lambda: {**large_fractions(), "flops_fraction": 100 * large_fractions()["flops_fraction"]}, "percentage"),
         (lambda: {**large_fractions(), "smallest_k": large_fractions()["smallest_k"] + 1}, "one too high")]),
    "ex-bw-fold": (
        lambda: fold,
        [(lambda: lambda q, scale, a: (q, scale * a), "negative scale"),
         (lambda: lambda q, scale, a: (q, scale * a.abs()), "did not change")]),
    "ex-e2e-welch": (
        welch,
        [(lambda: {**welch(), "standard_error": welch()["standard_error"] ** 2}, "variance"),
         (welch_slip, "n_i - 1"),
         (lambda: {**welch(), "dof": S("ex-e2e-welch").n1 + S("ex-e2e-welch").n2 - 2}, "pooled")]),
    "ex-e2e-reload": (
        reload_counts,
        [(lambda: {**reload_counts(), "sign activations": reload_counts()["sign activations"] + 3},
          "squeeze-excitation"),
         (lambda: {**reload_counts(), "shift-only BNs": reload_counts()["shift-only BNs"] + 3}, "projection")]),
    "ex-e2e-pareto": (
        lambda: pareto_sweep,
        [(lambda: lambda p: pareto_sweep(p, keep_duplicates=False), "duplicates"),
         (lambda: lambda p: pareto_sweep(p, ties_first=False), "ties in memory")]),
    "ex-prof-flops": (
        table1_conv_flops,
        [(lambda: table1_conv_flops() / 1e6, "MFLOPs"),
         (lambda: table1_conv_flops(macs_as_flops=1), "two FLOPs"),
         (lambda: 541.67e6, "paper reports")]),
    "ex-prof-convention": (
        convention_ratios,
        [(lambda: {k: 1 / v for k, v in convention_ratios().items()}, "inverted"),
         (lambda: {**convention_ratios(), "stored_mb": 1.0}, "MiB")]),
    "ex-prof-resolution": (
        lambda: {"follows": "pytorch", "paper_gap": paper_gap()},
        [(lambda: {"follows": "pytorch", "paper_gap": -paper_gap()}, "sign"),
         (lambda: {"follows": "paper", "paper_gap": paper_gap()}, "follows")]),
}


def test_every_check_has_cases():
    assert set(CASES) == set(ex.EXERCISES)


@pytest.mark.parametrize("label", sorted(CASES))
def test_check_accepts_the_right_answer_and_names_each_mistake(label):
    right, wrongs = CASES[label]
    verdict = ex.check(label, right())
    assert verdict.correct, verdict
    assert len(wrongs) >= 2
    for wrong, fragment in wrongs:
        verdict = ex.check(label, wrong())
        assert not verdict.correct, f"{label} accepted a wrong answer"
        assert fragment in verdict.message, f"{label}: expected a hint about {fragment!r}, got {verdict.message!r}"


def test_hints_do_not_give_the_numbers_away():
    """A wrong number's hint never contains the right number."""
    right = exact_batches()
    verdict = ex.check("ex-od-scaling", {k: v + 1 for k, v in right.items()})
    assert not any(str(v) in verdict.message for v in right.values())
    verdict = ex.check("ex-prof-flops", 1.0)
    assert str(table1_conv_flops()) not in verdict.message and f"{table1_conv_flops() / 1e6:.2f}" not in verdict.message


def test_unknown_exercise_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown exercise 'ex-od-scalling' \(did you mean 'ex-od-scaling'\?\)"):
        ex.check("ex-od-scalling", 1)
    with pytest.raises(ValueError, match="ex-prof-flops"):
        ex.expects("nope")


@pytest.mark.parametrize("label, answer", [
    ("ex-od-scaling", [1, 2]),  # a list where a dict is expected
    ("ex-od-scaling", {"ft-all": 1}),  # a key missing
    ("ex-prof-flops", "541"),  # a string where a number is expected
    ("ex-prof-flops", True),
    ("ex-bn-scaling", {"eval": "4*B*C*H*W", "shift_only": 4}),  # a string where a formula is expected
    ("ex-e2e-pareto", [0, 1]),  # a list where a function is expected
])
def test_wrong_type_is_a_clear_error(label, answer):
    with pytest.raises(TypeError, match=re.escape(label) + " expects"):
        ex.check(label, answer)


def test_unknown_symbol_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown symbol\(s\) D; use B, C, H, W"):
        ex.check("ex-bn-scaling", {"eval": sp.Symbol("D"), "shift_only": 4})


def test_symbols_match_by_name():
    """A reader's own symbols, without assumptions, count as the exercise's symbols of the same name."""
    B, C, H, W = sp.symbols("B C H W")
    assert ex.check("ex-bn-scaling", {"eval": 4 * B * C * H * W, "shift_only": 4 * C})


def test_no_answer_yet_says_what_to_hand_in():
    verdict = ex.check("ex-bw-int8", ...)
    assert not verdict and ex.expects("ex-bw-int8") in verdict.message


def test_reader_code_that_raises_is_feedback():
    def broken(x, g, gamma, eps):
        raise RuntimeError("oops")
    verdict = ex.check("ex-bn-identities", broken)
    assert not verdict and "RuntimeError: oops" in verdict.message
