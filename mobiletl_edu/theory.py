"""The symbolic side of MobileTL (Chiang et al. 2023): what the book derives and the tests check.

Everything here is sympy, one idea per function (the bound also has a float version):

* ``relu6`` / ``hardswish`` and their derivatives (Table 2, "exact" rows), written so that the
  value at each kink is the one PyTorch's autograd returns;
* ``sign_derivative`` and ``approximation_error`` (Table 2, "Ours" rows), with
  ``error_extrema`` and ``exact_set`` telling how large the error gets and where it vanishes;
* ``bn_gradients``: the scale, shift and input gradients of BatchNorm (Eq. 1-2) in training and
  evaluation mode, derived by differentiating the forward pass;
* ``geometric_closed_form`` and ``theorem1_bound``: the bound of Theorem 1;
* ``block_stored_terms``, ``block_stored_bytes``, ``block_parameters`` and ``block_forward_macs``:
  the training memory, parameters and MACs of one conv / MobileNetV2 / MobileNetV3 block
  (Table 1, Figure 1) as formulas in batch, channels, height, width, expansion and kernel.

One part is numeric, because Theorem 1 is about training: ``twin_training`` trains a small
network twice, with the exact and the approximated backward, and checks the lemma behind the
bound at every step (chapter 5).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import sympy as sp

from .choices import BLOCK_KINDS

x = sp.Symbol("x", real=True)
"""The pre-activation, the argument of every activation below."""

ACTIVATIONS = ("relu6", "hardswish")


# --------------------------------------------------------------------------------------------
# Activations and their derivatives (Table 2)
# --------------------------------------------------------------------------------------------

def relu6(var: sp.Symbol = x) -> sp.Piecewise:
    """ReLU6, ``min(max(0, x), 6)``, as a Piecewise whose pieces own the kinks as torch does."""
    return sp.Piecewise((0, var <= 0), (var, var < 6), (6, True))


def hardswish(var: sp.Symbol = x) -> sp.Piecewise:
    """Hard-Swish, ``x * ReLU6(x + 3) / 6`` (Table 2), as a Piecewise with torch's kink ownership."""
    return sp.Piecewise((0, var <= -3), (var * (var + 3) / 6, var < 3), (var, True))


def relu6_derivative(var: sp.Symbol = x) -> sp.Piecewise:
    """d ReLU6 / dx, obtained by differentiating each piece: ``1[0 < x < 6]``, torch's convention."""
    return sp.diff(relu6(var), var)


def hardswish_derivative(var: sp.Symbol = x) -> sp.Piecewise:
    """d Hard-Swish / dx: 0 for x <= -3, (2x + 3)/6 for -3 < x < 3, 1 for x >= 3 (as torch)."""
    return sp.diff(hardswish(var), var)


def table2_hardswish_derivative(var: sp.Symbol = x) -> sp.Expr:
    """Table 2's exact Hard-Swish backward, ``ReLU6(x + 3)/6 + x 1[-3 <= x <= 3]/6``, as printed."""
    inside = sp.Piecewise((1, (var >= -3) & (var <= 3)), (0, True))
    return relu6(var + 3) / 6 + var * inside / 6


def sign_derivative(var: sp.Symbol = x) -> sp.Piecewise:
    """MobileTL's backward for both activations (Table 2, "Ours"): ``1[x >= 0]``."""
    return sp.Piecewise((0, var < 0), (1, True))


def exact_derivative(kind: str, var: sp.Symbol = x) -> sp.Piecewise:
    """The exact derivative of ``kind`` (one of ``ACTIVATIONS``)."""
    if kind == "relu6":
        return relu6_derivative(var)
    if kind == "hardswish":
        return hardswish_derivative(var)
    raise ValueError(f"unknown activation {kind!r}; valid choices: {', '.join(ACTIVATIONS)}")


def approximation_error(kind: str, var: sp.Symbol = x) -> sp.Piecewise:
    """``1[x >= 0] - f'(x)``: what the sign approximation adds to the local derivative.

    The error in the propagated gradient is this times the upstream gradient.
    """
    folded = sp.piecewise_fold(sign_derivative(var) - exact_derivative(kind, var))
    return sp.piecewise_exclusive(folded)  # disjoint pieces, each with its own interval


def pieces(expr: sp.Piecewise, var: sp.Symbol = x) -> list[tuple[sp.Expr, sp.Set]]:
    """The (expression, set of x) pairs of a Piecewise on the real line, the sets disjoint."""
    return [(e, s) for e, s in expr.as_expr_set_pairs(sp.S.Reals) if s is not sp.S.EmptySet]


def exact_set(kind: str, var: sp.Symbol = x) -> sp.Set:
    """The x where the sign approximation equals the exact derivative."""
    return sp.solveset(approximation_error(kind, var), var, sp.S.Reals)


class ErrorExtrema(NamedTuple):
    sup: sp.Expr        # sup over x of |1[x >= 0] - f'(x)|
    attained: sp.Set    # the x where |error| equals sup


def error_extrema(kind: str, var: sp.Symbol = x) -> ErrorExtrema:
    """How large ``|approximation_error|`` gets, and where that supremum is reached."""
    from sympy.calculus.util import maximum, minimum

    def extremes(e, s):
        if s.is_FiniteSet:
            return [e.subs(var, p) for p in s]
        return [maximum(e, var, s), minimum(e, var, s)]

    parts = pieces(approximation_error(kind, var), var)
    sup = sp.Max(*[abs(v) for e, s in parts for v in extremes(e, s)])
    attained = sp.Union(*[sp.solveset(e - sign * sup, var, s) for e, s in parts for sign in (1, -1)])
    return ErrorExtrema(sup, attained)


# --------------------------------------------------------------------------------------------
# BatchNorm gradients (Eq. 1-2)
# --------------------------------------------------------------------------------------------

class BNGradients(NamedTuple):
    """Symbols of one BN channel over a batch of ``m`` values and the gradients of the loss."""
    xs: tuple        # inputs x_1..x_m
    gs: tuple        # upstream gradients dL/dy_1..dL/dy_m
    gamma: sp.Symbol
    beta: sp.Symbol
    mu: sp.Symbol    # running mean (used in eval mode)
    var: sp.Symbol   # running variance (used in eval mode)
    eps: sp.Symbol
    train: dict      # {"gamma": expr, "beta": expr, "x": (expr, ...)} with batch statistics
    eval: dict       # the same with the running statistics frozen


def batchnorm(xs, gamma, beta, mean, variance, eps):
    """Eq. (1): ``gamma (x - mean) / sqrt(variance + eps) + beta`` for each x of the channel."""
    return [gamma * (xi - mean) / sp.sqrt(variance + eps) + beta for xi in xs]


def bn_gradients(m: int = 3) -> BNGradients:
    """Differentiate Eq. (1) for one channel of ``m`` values: Eq. (2) and the input gradient.

    The loss is taken linear in the outputs, ``sum_i g_i y_i``, so ``g_i`` is dL/dy_i and each
    derivative is the backward pass of BN for an arbitrary upstream gradient. In train mode the
    mean and (biased) variance are those of the batch; in eval mode they are frozen symbols.
    """
    if m < 2:
        raise ValueError(f"a batch needs m >= 2 values, got m={m}")
    xs = sp.symbols(f"x1:{m + 1}", real=True)
    gs = sp.symbols(f"g1:{m + 1}", real=True)
    gamma, beta, mu = sp.symbols("gamma beta mu", real=True)
    var, eps = sp.symbols("sigma^2 epsilon", positive=True)
    batch_mean = sum(xs) / m
    batch_var = sum((xi - batch_mean) ** 2 for xi in xs) / m

    def grads(mean, variance):
        loss = sum(g * y for g, y in zip(gs, batchnorm(xs, gamma, beta, mean, variance, eps)))
        return {"gamma": sp.diff(loss, gamma), "beta": sp.diff(loss, beta),
                "x": tuple(sp.diff(loss, xi) for xi in xs)}

    return BNGradients(xs, gs, gamma, beta, mu, var, eps, grads(batch_mean, batch_var), grads(mu, var))


def bn_train_input_gradient_textbook(g: BNGradients) -> tuple:
    """The usual closed form of the train-mode input gradient, to compare with ``bn_gradients``:

    ``dL/dx_i = gamma / sqrt(var + eps) * (g_i - mean(g) - xhat_i * mean(g * xhat))``.
    """
    m = len(g.xs)
    mean = sum(g.xs) / m
    std = sp.sqrt(sum((xi - mean) ** 2 for xi in g.xs) / m + g.eps)
    xhat = [(xi - mean) / std for xi in g.xs]
    g_mean = sum(g.gs) / m
    gx_mean = sum(gi * hi for gi, hi in zip(g.gs, xhat)) / m
    return tuple(g.gamma / std * (gi - g_mean - hi * gx_mean) for gi, hi in zip(g.gs, xhat))


# --------------------------------------------------------------------------------------------
# Theorem 1
# --------------------------------------------------------------------------------------------

q = sp.Symbol("q", positive=True)
"""The ratio of a geometric series."""
L, l = sp.symbols("L l", integer=True, positive=True)
"""The number of trained layers, and the index of one of them."""


def geometric_sum(ratio=q, layers=L) -> sp.Sum:
    """``sum_{l=1}^{L} ratio^l``: one term per approximated layer the gradient crosses."""
    return sp.Sum(ratio ** l, (l, 1, layers))


def geometric_closed_form(ratio=q, layers=L) -> sp.Expr:
    """The closed form used in Theorem 1: ``ratio (1 - ratio^L) / (1 - ratio)`` (ratio != 1)."""
    return ratio * (1 - ratio ** layers) / (1 - ratio)


def psi(N, G):
    """Theorem 1's ratios: ``Psi = 3/2 sqrt(N) G`` (exact backward) and ``Psi~ = sqrt(N) G``."""
    if isinstance(N, sp.Basic) or isinstance(G, sp.Basic):
        return sp.Rational(3, 2) * sp.sqrt(N) * G, sp.sqrt(N) * G
    return 1.5 * math.sqrt(N) * G, math.sqrt(N) * G


def _log10_geometric(ratio: float, layers: int) -> float:
    """``log10`` of ``sum_{l=1}^{L} ratio^l`` for a float ratio > 0, stable near 1 and far above it."""
    if abs(ratio - 1) < 1e-12:
        return math.log10(layers)
    y = layers * math.log(ratio)  # ratio^L = e^y; |ratio^L - 1| = |expm1(y)|, kept in log space
    log_numerator = y + math.log1p(-math.exp(-y)) if y > 0 else math.log(-math.expm1(y))
    return (math.log(ratio) + log_numerator - math.log(abs(ratio - 1))) / math.log(10)


def theorem1_bound(lam, M, T, G, N, L):
    """Theorem 1: ``lam M T G (Psi (1-Psi^L)/(1-Psi) + Psi~ (1-Psi~^L)/(1-Psi~))``.

    With any sympy argument the result is a sympy expression; with numbers it is a float
    (``math.inf`` when it overflows), the ratio-1 case of the geometric sum taken as ``L``.
    """
    if any(isinstance(a, sp.Basic) for a in (lam, M, T, G, N, L)):
        psi_exact, psi_sign = psi(N, G)
        return lam * M * T * G * (geometric_closed_form(psi_exact, L) + geometric_closed_form(psi_sign, L))
    log10_value = theorem1_log10_bound(lam, M, T, G, N, L)
    return 10.0 ** log10_value if log10_value < 308 else math.inf


def theorem1_log10_bound(lam, M, T, G, N, L) -> float:
    """``log10`` of Theorem 1's bound for positive numbers, exact in log space for Psi far above 1."""
    psi_exact, psi_sign = psi(N, G)
    a, b = sorted((_log10_geometric(psi_exact, L), _log10_geometric(psi_sign, L)))
    return math.log10(lam * M * T * G) + b + math.log10(1 + 10.0 ** (a - b))


# --------------------------------------------------------------------------------------------
# Stored activations of one block (Table 1, Figure 1)
# --------------------------------------------------------------------------------------------

B, C, H, W = sp.symbols("B C H W", integer=True, positive=True)
"""Batch size, block input (= output) channels, height and width of the block's maps."""
e, k, s = sp.symbols("e k s", integer=True, positive=True)
"""Expansion ratio, kernel size of the (depthwise) convolution, squeeze-excitation width."""

BLOCK_METHODS = ("ft-blocks", "mobiletl")
STORAGES = ("paper", "pytorch")


class StoredTerm(NamedTuple):
    """One tensor a layer of the block keeps for its backward pass."""
    layer: str
    what: str
    elements: sp.Expr   # how many numbers the tensor holds
    bits: sp.Expr       # bits per number (32 for a float map, 1 or 2 for a mask)

    @property
    def bytes(self) -> sp.Expr:
        return self.elements * self.bits / 8


def se_width(channels: int, expansion: int) -> int:
    """torchvision's squeeze-excitation width: ``channels * expansion / 4`` rounded to a multiple of 8."""
    quarter = channels * expansion // 4
    width = max(8, (quarter + 4) // 8 * 8)
    return width + 8 if width < 0.9 * quarter else width


def block_stored_terms(kind: str, method: str = "ft-blocks", storage: str = "paper",
                       relu6_bits: int = 2) -> list[StoredTerm]:
    """What each layer of one stride-1 block keeps for backward, as symbols (Table 1, Figure 1).

    The block sits inside a trained region (its input needs a gradient). ``storage="paper"`` is
    the TinyTL-style accounting (a conv keeps its input, a BN its input only when its scale
    trains, ReLU a 1-bit mask, exact ReLU6 a ``relu6_bits`` mask, Hard-Swish/-Sigmoid their
    input); ``"pytorch"`` is what eager PyTorch keeps, each tensor once. ``method="mobiletl"``
    makes the intermediate BNs shift-only and the activations 1-bit sign masks.
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block {kind!r}; valid choices: {', '.join(BLOCK_KINDS)}")
    if method not in BLOCK_METHODS:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(BLOCK_METHODS)}")
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; valid choices: {', '.join(STORAGES)}")
    if kind == "conv" and method == "mobiletl":
        raise ValueError("MobileTL rebuilds inverted residual blocks; use method 'ft-blocks' for 'conv'")
    torch_like, mobiletl = storage == "pytorch", method == "mobiletl"
    narrow, wide = B * C * H * W, B * C * e * H * W  # the block's input map, an expanded map
    terms = []

    def bn(name, n, channels, full):
        if full:
            terms.append(StoredTerm(name, "input", n, 32))
            if torch_like:
                terms.append(StoredTerm(name, "batch mean and 1/std", 2 * channels, 32))
        elif torch_like:  # shift-only BN: the per-channel multiplier
            terms.append(StoredTerm(name, "per-channel scale", channels, 32))

    def activation(name, n, exact):
        if mobiletl:
            terms.append(StoredTerm(name, "1-bit sign mask", n, 1))
        elif exact == "relu" and not torch_like:
            terms.append(StoredTerm(name, "1-bit mask", n, 1))
        elif exact == "relu6" and not torch_like:
            terms.append(StoredTerm(name, f"{relu6_bits}-bit mask", n, relu6_bits))
        else:  # PyTorch: ReLU its output, in-place ReLU6/Hard-Swish a copy of the input
            terms.append(StoredTerm(name, "output" if exact == "relu" else "input", n, 32))

    if kind == "conv":
        terms.append(StoredTerm("conv", "input", narrow, 32))
        bn("bn", narrow, C, True)
        activation("relu", narrow, "relu")
        return terms
    act = "relu6" if kind == "mbv2" else "hardswish"
    terms.append(StoredTerm("expand conv", "input", narrow, 32))
    bn("expand bn", wide, C * e, not mobiletl)
    activation(f"expand {act}", wide, act)
    terms.append(StoredTerm("depthwise conv", "input", wide, 32))
    bn("depthwise bn", wide, C * e, not mobiletl)
    activation(f"depthwise {act}", wide, act)
    if kind == "mbv3":  # squeeze-excitation, left exact by MobileTL
        pooled = B * C * e
        terms.append(StoredTerm("se fc1", "input", pooled, 32))
        terms.append(StoredTerm("se relu", "output" if torch_like else "1-bit mask", B * s, 32 if torch_like else 1))
        if not torch_like:  # PyTorch: fc2's input is the ReLU output already kept
            terms.append(StoredTerm("se fc2", "input", B * s, 32))
        terms.append(StoredTerm("se hardsigmoid", "input", pooled, 32))
        terms.append(StoredTerm("se scale x input", "input", wide, 32))
        terms.append(StoredTerm("se scale x input", "scale", pooled, 32))
    terms.append(StoredTerm("project conv", "input", wide, 32))
    bn("project bn", narrow, C, True)
    return terms


def block_stored_bytes(kind: str, method: str = "ft-blocks", storage: str = "paper",
                       relu6_bits: int = 2) -> sp.Expr:
    """The total of ``block_stored_terms``, in bytes, as a sympy expression in B, C, H, W, e, s."""
    return sp.expand(sum(t.bytes for t in block_stored_terms(kind, method, storage, relu6_bits)))


def block_parameters(kind: str) -> sp.Expr:
    """Parameters of one block (Table 1's "# Param"), in C, e, k and s: conv weights + BN scale and shift."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block {kind!r}; valid choices: {', '.join(BLOCK_KINDS)}")
    if kind == "conv":
        return sp.expand(k**2 * C**2 + 2 * C)
    hidden = C * e
    irb = (C * hidden + 2 * hidden) + (k**2 * hidden + 2 * hidden) + (hidden * C + 2 * C)
    if kind == "mbv3":
        irb += (hidden * s + s) + (s * hidden + hidden)  # squeeze-excitation: two 1x1 convs with bias
    return sp.expand(irb)


def block_forward_macs(kind: str) -> sp.Expr:
    """Multiply-accumulates of the block's convolutions in one forward pass (stride 1, same padding)."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block {kind!r}; valid choices: {', '.join(BLOCK_KINDS)}")
    if kind == "conv":
        return sp.expand(B * H * W * k**2 * C**2)
    hidden = C * e
    macs = B * H * W * (C * hidden + k**2 * hidden + hidden * C)
    if kind == "mbv3":
        macs += B * 2 * hidden * s
    return sp.expand(macs)


# --------------------------------------------------------------------------------------------
# Theorem 1, measured (chapter 5): twin training runs, and the lemma checked at every step
# --------------------------------------------------------------------------------------------

class TwinTask(NamedTuple):
    """The fixed data of a twin experiment: a teacher-labelled Gaussian task, float64."""
    inputs: "torch.Tensor"
    labels: "torch.Tensor"
    probe: "torch.Tensor"        # where the two trained networks' outputs are compared
    batch_order: "torch.Tensor"  # steps x batch indices: both twins see the same batches


def twin_task(width: int = 16, classes: int = 4, examples: int = 512, batch: int = 16, steps: int = 100,
              probe: int = 64, seed: int = 0) -> TwinTask:
    """Inputs labelled by a fixed random teacher, a probe batch, and the order of the batches."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, width, generator=gen, dtype=torch.float64)
    teacher = torch.randn(width, classes, generator=gen, dtype=torch.float64)
    labels = (torch.tanh(inputs) @ teacher).argmax(dim=1)
    probe_batch = torch.randn(probe, width, generator=gen, dtype=torch.float64)
    order = torch.randint(0, examples, (steps, batch), generator=gen)
    return TwinTask(inputs, labels, probe_batch, order)


def hardswish_net(layers: int, width: int, classes: int, activation):
    """``layers`` trained bias-free Linear + ``activation`` layers, then a frozen linear head.

    The weights keep pre-activations at unit scale at every depth (as BN does in a block): a
    unit Gaussian through Hard-Swish has second moment E[HS(z)^2], so the layers after the
    first get the gain 1 / sqrt(E[HS(z)^2]).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    z = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    second_moment = torch.trapezoid(F.hardswish(z) ** 2 * torch.exp(-z**2 / 2), z).item() / math.sqrt(2 * math.pi)
    trained = nn.ModuleList(nn.Linear(width, width, bias=False, dtype=torch.float64) for _ in range(layers))
    for i, layer in enumerate(trained):
        nn.init.normal_(layer.weight, std=(1 if i == 0 else second_moment ** -0.5) / math.sqrt(width))
    head = nn.Linear(width, classes, dtype=torch.float64).requires_grad_(False)
    return nn.ModuleDict({"layers": trained, "head": head}), activation


def _forward(net, activation, x, layer_inputs):
    for layer in net["layers"]:
        layer_inputs.append(x)
        x = activation(layer(x))
    layer_inputs.append(x)  # a_L, whose gradient the lemma starts from
    return net["head"](x)


def twin_training(layers: int, task: TwinTask, lr: float, checkpoints=(1, 3, 10, 30, 100),
                  seed: int = 1, approximated=None) -> list[dict]:
    """Train exact and sign-approximated twins from one start on the same batches (plain SGD).

    At every step, with ``G`` the largest of Theorem 1's three bounded quantities seen so far
    (loss gradient at ``a_L``, the weights' spectral norms, the layer inputs; Frobenius norms
    over the batch), it checks our lemma: ``||grad W_l|| <= G Psi^(L-l+1)``, with Psi for the
    exact run and Psi~ for the approximated one. Each checkpoint records the probe distance
    ``||F(W~) - F(W)||``, the estimated constants and the largest ratio of a layer's gradient
    norm to its lemma bound so far (``lemma_ratio``; the lemma holds while it is <= 1), and
    the same for the spectral version with ``3/2 G`` and ``G`` in place of Psi and Psi~.
    ``approximated`` is the second twin's activation (default: ``ops.sign_hardswish``).
    """
    import torch
    import torch.nn.functional as F

    from .ops import sign_hardswish

    width, classes = task.inputs.shape[1], int(task.labels.max()) + 1
    torch.manual_seed(seed)
    exact = hardswish_net(layers, width, classes, F.hardswish)
    approx = hardswish_net(layers, width, classes, approximated or sign_hardswish)
    approx[0].load_state_dict(exact[0].state_dict())  # the same start
    twins = [(net, act, torch.optim.SGD(net["layers"].parameters(), lr=lr), factor)
             for (net, act), factor in ((exact, 1.5), (approx, 1.0))]
    G = G_grad = lipschitz = lemma = lemma_spectral = 0.0
    parts = [0.0, 0.0, 0.0]  # loss gradient at a_L, weight spectral norm, layer input
    records = []
    for t in range(1, max(checkpoints) + 1):
        batch = task.batch_order[t - 1]
        for net, activation, optimizer, factor in twins:
            acts = []
            loss = F.cross_entropy(_forward(net, activation, task.inputs[batch], acts), task.labels[batch])
            a_last = acts.pop()
            a_last.retain_grad()
            optimizer.zero_grad()
            loss.backward()
            parts = [max(parts[0], a_last.grad.norm().item()),
                     max(parts[1], *(torch.linalg.matrix_norm(w.weight, 2).item() for w in net["layers"])),
                     max(parts[2], *(a.norm().item() for a in acts))]
            G = max(parts)
            grads = [w.weight.grad.norm().item() for w in net["layers"]]
            G_grad = max(G_grad, math.sqrt(sum(g * g for g in grads)))
            ratio = factor * math.sqrt(width) * G  # Psi or Psi~
            for l, g in enumerate(grads, start=1):
                lemma = max(lemma, g / (G * ratio ** (layers - l + 1)))
                lemma_spectral = max(lemma_spectral, g / (G * (factor * G) ** (layers - l + 1)))
            optimizer.step()
        with torch.no_grad():
            distance = (_forward(*exact, task.probe, []) - _forward(*approx, task.probe, [])).norm().item()
            weights = [torch.cat([w.reshape(-1) for w in net[0]["layers"].parameters()]) for net in (exact, approx)]
            weight_distance = (weights[0] - weights[1]).norm().item()
        if weight_distance > 0:
            lipschitz = max(lipschitz, distance / weight_distance)
        if t in checkpoints:
            records.append(dict(L=layers, T=t, distance=distance, weight_distance=weight_distance, M=lipschitz,
                                G=G, G_parts=tuple(parts), G_grad=G_grad, lemma_ratio=lemma,
                                lemma_ratio_spectral=lemma_spectral))
    return records
