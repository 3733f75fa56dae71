"""Figures and diagrams for the book, drawn from the package's own profiles and graphs.

Each helper returns a ``matplotlib.figure.Figure`` built without pyplot, so it works in a
notebook, a script or a test alike and leaves no global state behind. Layers are labelled in
the book's words ("expand BN", "depthwise Hard-Swish"), read from the module tree by
:func:`layer_label`, never typed per figure.
"""
from __future__ import annotations

import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from .ops import ShiftOnlyBatchNorm2d, SignHardswish, SignReLU, SignReLU6
from .profiler import Profile

# The book's names for the layers of a block, by module type.
_ACTIVATION_NAMES = {nn.Hardswish: "Hard-Swish", SignHardswish: "Hard-Swish", nn.ReLU6: "ReLU6",
                     SignReLU6: "ReLU6", nn.ReLU: "ReLU", SignReLU: "ReLU", nn.Hardsigmoid: "Hard-Sigmoid"}
_SE_PARTS = {"avgpool": "SE pool", "fc1": "SE fc1", "activation": "SE ReLU", "fc2": "SE fc2",
             "scale_activation": "SE Hard-Sigmoid"}
# Colours by kind of layer, the same in every diagram.
_KIND_COLOURS = {"conv": "#c6dbef", "BN": "#fdd0a2", "act": "#c7e9c0", "SE": "#dadaeb", "add": "#e0e0e0"}


def use_book_style() -> None:
    """Figures as SVG, with fonts that stay readable when the page shrinks them to the column."""
    import matplotlib as mpl

    mpl.rcParams.update({"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10,
                         "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9,
                         "svg.fonttype": "path", "figure.dpi": 100})
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # outside IPython: nothing to configure
        return
    set_matplotlib_formats("svg")


def _stage(conv_block: nn.Module, siblings: list[nn.Module]) -> str:
    """expand / depthwise / project: the role of one conv-BN-activation stage of a block."""
    conv = conv_block[0]
    if getattr(conv, "groups", 1) > 1:
        return "depthwise"
    stages = [m for m in siblings if isinstance(m, Conv2dNormActivation)]
    if len(stages) > 1 and conv_block is stages[-1]:
        return "project"
    return "expand" if len(stages) > 1 else ""


def layer_label(block: nn.Module, name: str) -> str:
    """The book's name for the submodule ``name`` of ``block``: "expand BN", "SE fc1", ...

    Works on a plain or a prepared (MobileTL) block: the name says what the layer *is*; what it
    keeps for backward is said elsewhere.
    """
    if name in ("", "(model)"):  # the profiler's name for the block itself
        return "residual add" if getattr(block, "use_res_connect", False) else "block"
    module = block.get_submodule(name)
    path = name.split(".")
    for i in range(len(path) - 1, -1, -1):  # the closest enclosing SE or conv stage
        parent = block.get_submodule(".".join(path[:i]))
        child = path[i]
        if isinstance(parent, SqueezeExcitation):
            return _SE_PARTS.get(child, f"SE {child}")
        if isinstance(module, SqueezeExcitation):
            return "SE scale × input"
        if isinstance(parent, Conv2dNormActivation):
            grand = block.get_submodule(".".join(path[:i - 1])) if i > 0 else block
            stage = _stage(parent, list(grand.children()) if isinstance(grand, nn.Sequential) else [parent])
            return f"{stage} {_kind_name(module)}".strip()
    return _kind_name(module)


def _kind_name(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, (nn.BatchNorm2d, ShiftOnlyBatchNorm2d)):
        return "BN"
    return _ACTIVATION_NAMES.get(type(module), type(module).__name__)


def _kind(label: str) -> str:
    if label.startswith("SE"):
        return "SE"
    for kind in ("conv", "BN"):
        if label.endswith(kind):
            return kind
    return "add" if label in ("residual add", "block") else "act"


def _kept(stored: str, n_bytes: int) -> str:
    return "nothing" if not n_bytes else f"{stored}, {_size(n_bytes)}"


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e3:.1f} kB" if n_bytes < 1e6 else f"{n_bytes / 1e6:.2f} MB"


def plot_block_diagram(block: nn.Module, vanilla: Profile, mobiletl: Profile, title: str = "") -> Figure:
    """The paper's Figure 2 as a column of layers, with what each keeps for backward.

    ``vanilla`` and ``mobiletl`` are profiles of the same block (``profiler.profile_block``
    with ``ft-blocks`` and ``mobiletl``); ``block`` is the block they were taken of, used only
    for the layer names. The two right-hand columns are the profiler's per-layer
    ``stored`` entries, so the diagram says what the rule table says.
    """
    names = [layer.name for layer in vanilla.layers]
    if names != [layer.name for layer in mobiletl.layers]:
        raise ValueError("the two profiles are not of the same block: their layer names differ")
    order = sorted(range(len(names)), key=lambda i: names[i] in ("", "(model)"))  # the add last
    rows = len(order)
    fig = Figure(figsize=(6.6, 0.36 * rows + 0.9), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.3, rows)
    ax.axis("off")
    columns = ((1.55, "layer (input at the bottom)"), (5.35, "vanilla fine-tuning keeps"),
               (8.55, "MobileTL keeps"))
    for x, head in columns:
        ax.text(x, rows - 0.3, head, ha="center", fontsize=10, weight="bold")
    for row, i in enumerate(order):
        label = layer_label(block, names[i])
        ax.add_patch(FancyBboxPatch((0.05, row - 0.38), 3.0, 0.76, boxstyle="round,pad=0.02",
                                    facecolor=_KIND_COLOURS[_kind(label)], edgecolor="0.4", lw=0.8))
        ax.text(1.55, row, label, ha="center", va="center", fontsize=10)
        if row:
            ax.annotate("", (1.55, row - 0.4), (1.55, row - 0.6), arrowprops=dict(arrowstyle="->", lw=0.8))
        for (x, _), profile in zip(columns[1:], (vanilla, mobiletl)):
            layer = profile.layers[i]
            colour = "0.55" if not layer.activation_bytes else ("#b15928" if "mask" in layer.stored else "black")
            ax.text(x, row, _kept(layer.stored, layer.activation_bytes), ha="center", va="center",
                    fontsize=10, color=colour)
    ax.plot([0.05, 9.95], [-0.6, -0.6], color="0.6", lw=0.6)
    for (x, _), profile in zip(columns[1:], (vanilla, mobiletl)):
        ax.text(x, -1.05, f"total {_size(profile.activation_bytes)}", ha="center", fontsize=10,
                weight="bold")
    if title:
        ax.set_title(title)
    return fig


def plot_block_activations(vanilla: Profile, mobiletl: Profile, title: str = "",
                           block: nn.Module | None = None) -> Figure:
    """Figure 1: stored activations per layer of one block, vanilla fine-tuning against MobileTL.

    Both profiles must be of one block (``profiler.profile_block`` with ``ft-blocks`` and
    ``mobiletl``): MobileTL replaces layers in place, so their names match. Layers that store
    nothing in either are left out. With ``block`` (the block profiled) the layers are named
    in the book's words, otherwise by module path and rule.
    """
    names = [layer.name for layer in vanilla.layers]
    if names != [layer.name for layer in mobiletl.layers]:
        raise ValueError("the two profiles are not of the same block: their layer names differ")
    shown = [i for i, (a, b) in enumerate(zip(vanilla.layers, mobiletl.layers))
             if a.activation_bytes or b.activation_bytes]
    labels = [layer_label(block, names[i]) if block is not None
              else f"{names[i]} ({vanilla.layers[i].rule.split(' (')[0]})" for i in shown]
    y = range(len(shown))
    fig = Figure(figsize=(7.0, 0.32 * len(shown) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    height = 0.4
    for offset, profile, name in ((-height / 2, vanilla, "vanilla"), (height / 2, mobiletl, "MobileTL")):
        ax.barh([i + offset for i in y], [profile.layers[i].activation_bytes / 1e6 for i in shown], height,
                label=f"{name}: {profile.mb(profile.activation_bytes):.3f} MB in all")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()  # input at the top, as the layers run
    ax.set_xlabel("stored for backward (MB)")
    saved = 1 - mobiletl.activation_bytes / vanilla.activation_bytes if vanilla.activation_bytes else 0.0
    ax.legend(title=f"{100 * saved:.1f} % less with MobileTL", loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    return fig


def plot_finetuning_sweep(sweep: dict, title: str = "") -> Figure:
    """Figure 4: forward and backward MFLOPs (bars, left axis) and stored activations (line, right).

    ``sweep`` maps a setting's label (FT-Last, FT-1-BLKs, ..., FT-All) to its Profile, in the
    order to plot, as ``profiler.finetuning_sweep`` returns it.
    """
    if not sweep:
        raise ValueError("the sweep is empty: nothing to plot")
    labels, profiles = list(sweep), list(sweep.values())
    x = range(len(labels))
    fig = Figure(figsize=(7.2, 3.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.4
    ax.bar([i - width / 2 for i in x], [p.forward_flops / 1e6 for p in profiles], width, label="forward")
    ax.bar([i + width / 2 for i in x], [p.backward_flops / 1e6 for p in profiles], width, label="backward")
    short = [label.replace("-BLKs", "").replace("FT-", "") for label in labels]
    ax.set_xticks(list(x), short)
    ax.set_xlabel("fine-tuned blocks K (Last: classifier only; All: every layer)")
    ax.set_ylabel("MFLOPs")
    memory = ax.twinx()
    memory.plot(list(x), [p.mb(p.activation_bytes) for p in profiles], "o-", color="black",
                label="stored activations")
    memory.set_ylabel("stored activations (MB)")
    memory.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + memory.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
    if title:
        ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------------------------
# The backward graph of one block, as autograd records it


def backward_graph(block: nn.Module, inputs: torch.Tensor) -> list[dict]:
    """One forward pass of ``block``; its autograd graph grouped by layer, output first.

    Each entry: ``name`` (the layer's module path), ``label`` (the book's word for it),
    ``saved`` (``[(what, dtype, shape, bytes, storage)]``: the tensors its backward nodes keep,
    leaving out parameters and buffers; ``storage`` tells two views of one tensor apart), ``trains`` (its parameters that receive a gradient) and
    ``next`` (the names of the layers the gradient flows to; ``"input"`` for the block input).
    """
    heads: dict = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: _remember(heads, out, n))
             for n, m in block.named_modules() if not isinstance(m, (nn.Sequential, Conv2dNormActivation))]
    try:
        out = block(inputs)
    finally:
        for h in hooks:
            h.remove()
    state = {t.untyped_storage().data_ptr(): name for name, t in
             [*block.named_parameters(), *block.named_buffers()]}
    params = {p.untyped_storage().data_ptr(): name for name, p in block.named_parameters()}
    layers, todo, done = [], [out.grad_fn], set()
    while todo:
        head = todo.pop(0)
        if head in done:
            continue
        done.add(head)
        entry = {"name": heads[head], "label": layer_label(block, heads[head]), "saved": [], "trains": [],
                 "next": []}
        inner = [head]
        while inner:  # the nodes of this layer: everything up to the next layer's head
            node = inner.pop()
            entry["saved"] += _saved_tensors(node, state)
            for child, _ in node.next_functions:
                if child is None:
                    continue
                if child in heads:
                    entry["next"].append(heads[child])
                    todo.append(child)
                elif type(child).__name__ == "AccumulateGrad":
                    leaf = child.variable
                    name = params.get(leaf.untyped_storage().data_ptr())
                    entry["trains" if name else "next"].append(name.split(".")[-1] if name else "input")
                else:
                    inner.append(child)
        layers.append(entry)
    return layers


def saved_bytes(layers: list[dict]) -> int:
    """Bytes the graph keeps for backward, each storage once (a tensor two layers save counts once)."""
    return sum({t[4]: t[3] for entry in layers for t in entry["saved"]}.values())


def _remember(heads: dict, out, name: str) -> None:
    if isinstance(out, torch.Tensor) and out.grad_fn is not None:
        heads.setdefault(out.grad_fn, name)


def _saved_tensors(node, state: dict) -> list[tuple]:
    """The tensors one autograd node keeps, without the parameters and buffers it refers to."""
    found = []
    names = [a for a in dir(node) if a.startswith("_saved_")]
    values = [(a[len("_saved_"):], getattr(node, a)) for a in names]
    if hasattr(node, "saved_tensors"):  # a custom autograd.Function
        values += [("mask", t) for t in node.saved_tensors]
    for what, t in values:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in state:
            found.append((what, t.dtype, tuple(t.shape), t.numel() * t.element_size(),
                          t.untyped_storage().data_ptr()))
    return found


def _saved_text(entry: dict) -> str:
    """"map 6.4 kB + 0.3 kB": feature maps, 1-bit masks, and (after a "+") vectors: one number
    per channel or per example, such as BN's batch statistics or SE's pooled input."""
    kinds: dict = {}
    for _, dtype, shape, n_bytes, _ in entry["saved"]:
        if dtype == torch.uint8:
            kind = "1-bit mask"
        elif len(shape) == 4 and shape[2] * shape[3] > 1:
            kind = "map"
        else:
            kind = "vectors"
        kinds[kind] = kinds.get(kind, 0) + n_bytes
    if not kinds:
        return "nothing"
    vectors = kinds.pop("vectors", 0)
    if not kinds:
        return f"vectors {_size(vectors)}"
    text = " + ".join(f"{k} {_size(b)}" for k, b in kinds.items())
    return text + (f" + {_size(vectors)}" if vectors else "")


def _depths(layers: list[dict]) -> dict:
    """Longest distance of each layer (and of ``input``) from the block's output."""
    depth = {layers[0]["name"]: 0}
    by_name = {e["name"]: e for e in layers}
    changed = True
    while changed:  # a DAG of a dozen nodes: relax until nothing moves
        changed = False
        for e in layers:
            for target in e["next"]:
                if e["name"] in depth and depth.get(target, -1) < depth[e["name"]] + 1:
                    depth[target] = depth[e["name"]] + 1
                    changed = target in by_name or changed
    depth["input"] = max(depth.values()) + (0 if "input" in depth and depth["input"] > max(
        v for k, v in depth.items() if k != "input") else 1)
    return depth


def plot_backward_graph(graphs: dict, title: str = "") -> Figure:
    """Draw :func:`backward_graph` results side by side (one panel per entry of ``graphs``).

    The gradient flows from the block's output (top) to its input (bottom). Each box is one
    layer, with what its backward keeps; 1-bit masks are written in amber, full float maps in
    black. Squeeze-excitation's branch runs to the right of the main path.
    """
    tallest = max(max(_depths(g).values()) for g in graphs.values()) + 1
    fig = Figure(figsize=(3.6 * len(graphs), 0.55 * tallest + 0.8), layout="constrained")
    axes = fig.subplots(1, len(graphs), squeeze=False)[0]
    for ax, (panel, layers) in zip(axes, graphs.items()):
        total = saved_bytes(layers)
        depth = _depths(layers)
        column = {e["name"]: int(e["label"].startswith("SE ") and e["label"] != "SE scale × input")
                  for e in layers}
        column["input"] = 0
        place = {name: (0.6 + 1.95 * column[name], -d) for name, d in depth.items()}
        occupied = {(column[n], -d) for n, d in depth.items()}
        ax.set_xlim(-0.5, 3.5)
        ax.set_ylim(-tallest + 0.4, 0.55)
        ax.axis("off")
        for e in layers:
            x, y = place[e["name"]]
            masked = any(t[1] == torch.uint8 for t in e["saved"])
            ax.add_patch(FancyBboxPatch((x - 0.88, y - 0.34), 1.76, 0.68, boxstyle="round,pad=0.02",
                                        facecolor=_KIND_COLOURS[_kind(e["label"])], edgecolor="0.4", lw=0.8))
            ax.text(x, y + 0.13, e["label"] + (" (trains)" if e["trains"] else ""), ha="center",
                    va="center", fontsize=9)
            ax.text(x, y - 0.15, _saved_text(e), ha="center", va="center", fontsize=8.5,
                    color="#b15928" if masked else ("0.45" if not e["saved"] else "black"))
            for target in e["next"]:
                tx, ty = place[target]
                between = any((column[e["name"]], r) in occupied for r in range(int(ty) + 1, int(y)))
                arrow = dict(arrowstyle="->", lw=0.8, color="0.35")
                if tx == x and between:  # a skip connection: around the left of the main path
                    ax.plot([x - 0.88, -0.35, -0.35], [y, y, ty], color="0.35", lw=0.8)
                    ax.annotate("", (tx - 0.88, ty), (-0.35, ty), arrowprops=arrow)
                else:
                    ax.annotate("", (tx, ty + 0.32), (x, y - 0.32), arrowprops=arrow)
        x, y = place["input"]
        ax.add_patch(FancyBboxPatch((x - 0.88, y - 0.34), 1.76, 0.68, boxstyle="round,pad=0.02",
                                    facecolor="white", edgecolor="0.4", lw=0.8, linestyle="--"))
        ax.text(x, y, "to the block's input", ha="center", va="center", fontsize=9)
        ax.set_title(f"{panel}: autograd saves {_size(total)}", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Accuracy against memory (Figures 5 to 7 of the paper)

_MEMORY_LABELS = {"stored_activation_mb": "stored activations, measured (MB)",
                  "analytic_memory_mb": "memory footprint, analytic (MB)",
                  "peak_memory_mb": "peak memory, measured (MB)"}
_MARKERS = "osD^vP*Xph<>"


def _seeds_label(rows: list[dict]) -> str:
    seeds = sorted({int(r.get("seeds") or 1) for r in rows})
    if seeds == [1]:
        return "top-1 accuracy (%), one seed"
    what = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]} seeds"
    return f"top-1 accuracy (%), mean ± std over {what}"


def plot_accuracy_vs_memory(rows: list[dict], memory: str = "stored_activation_mb", title: str = ""):
    """Figures 5 to 7: top-1 against ``memory``, one panel per dataset, the Pareto front dashed.

    ``rows`` are ``experiments.results_table`` rows. Each method (with its K, and its model when
    the rows hold several) has its own colour and marker, named in a legend below the panels
    rather than beside the points, so no labels collide; marker area grows with the training
    FLOPs (all equal without a profiler). Error bars (one standard deviation) appear only for
    rows with more than one seed, and the y label says how many seeds there are.
    """
    from .experiments import pareto_front

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    several_models = len({r["model"] for r in rows}) > 1

    def name(r):
        label = r["method"] + (f" (K={r['blocks']})" if r["blocks"] else "")
        return f"{r['model']}: {label}" if several_models else label

    names = list(dict.fromkeys(name(r) for r in rows))
    style = {n: (f"C{i % 10}", _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}
    flops = [r["training_mflops"] for r in rows if r.get("training_mflops")]
    largest = max(flops) if flops else None
    fig = Figure(figsize=(min(7.4, 4.2 * len(datasets)) if len(datasets) > 1 else 7.0,
                          4.0 + 0.22 * ((len(names) + 2) // 3)), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        points = [(r[memory], r["top1_mean"]) for r in mine]
        front = pareto_front(points)
        for i, (r, (m, a)) in enumerate(zip(mine, points)):
            colour, marker = style[name(r)]
            if int(r.get("seeds") or 1) > 1:
                ax.errorbar(m, a, yerr=r["top1_std"], fmt="none", ecolor=colour, alpha=0.6,
                            capsize=3, zorder=1)
            size = 40 + 400 * r["training_mflops"] / largest if largest and r.get("training_mflops") else 90
            ax.scatter(m, a, s=size, color=colour, marker=marker, alpha=0.8, zorder=2,
                       edgecolors="black" if i in front else "none", linewidths=1.2, label=name(r))
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1,
                label="Pareto front", zorder=0)
        ax.set_xlabel(_MEMORY_LABELS.get(memory, memory))
        ax.set_title(dataset if len(datasets) > 1 else (title or dataset))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_seeds_label(rows))
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    legend = fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                        ncol=3, fontsize=8, markerscale=0.6, frameon=False)
    legend.set_title("black edge: on the Pareto front; marker area ~ training FLOPs"
                     if largest else "black edge: on the Pareto front", prop={"size": 8})
    if title and len(datasets) > 1:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------
# Training memory (chapter 8): one step's timeline, and the peak as the work grows

PHASE_COLORS = {"frozen-bottom forward": "#dbe9f6", "trained forward": "#fde7cf", "backward": "#e3f1dd",
                "optimizer step": "#efe3f3"}


def method_label(method: str, blocks: int | None = None) -> str:
    """A method's name as the paper writes it: FT-All, FT-3-BLKs, MobileTL-3, TinyTL-3, ..."""
    names = {"ft-all": "FT-All", "ft-last": "FT-Last", "ft-bn": "FT-BN", "ft-bias": "FT-Bias",
             "ft-blocks": "FT-{}-BLKs", "mobiletl": "MobileTL-{}", "tinytl-lite-residual": "TinyTL-{}",
             "mobiletl+tinytl-lite-residual": "MobileTL+TinyTL-{}"}
    return names.get(method, method + (" ({})" if blocks else "")).format(blocks)


def plot_memory_timeline(runs: dict, title: str | None = None) -> Figure:
    """Live tensor bytes during one training step, one panel per setup, the phases shaded.

    ``runs`` maps a label to ``measure.tensor_step(..., timeline=True)``'s result; an entry
    ``"analytic"`` (a ``profiler.TrainingPeak``) adds its step peak as a dashed line.
    """
    if not runs:
        raise ValueError("no runs to plot")
    fig = Figure(figsize=(7.0, 2.1 * len(runs) + 0.6), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharey=True, squeeze=False)[:, 0]
    for ax, (label, run) in zip(axes, runs.items()):
        if "timeline" not in run:
            raise ValueError(f"{label}: measure with tensor_step(..., timeline=True)")
        for phase, (start, end) in sorted(run["phases"].items(), key=lambda item: item[1][0]):
            ax.axvspan(1e3 * start, 1e3 * end, color=PHASE_COLORS.get(phase, "#eeeeee"), lw=0)
            ax.text(1e3 * (start + end) / 2, 1.0, phase.replace(" forward", "\nforward").replace(" step", "\nstep"),
                    transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7)
        times = [0.0] + [1e3 * t for t, _ in run["timeline"]]
        live = [0.0] + [b / 1e6 for _, b in run["timeline"]]
        ax.plot(times, live, drawstyle="steps-post", color="black", lw=1, label="measured (allocator)")
        if "analytic" in run:
            ax.axhline(run["analytic"].step_bytes / 1e6, color="tab:red", ls="--", lw=1, label="analytic peak")
        ax.set_title(f"{label}: peak {run['step_peak_bytes'] / 1e6:.1f} MB added to "
                     f"{sum(run['state'].values()) / 1e6:.1f} MB", fontsize=9, loc="left")
        ax.set_ylabel("MB added")
        ax.set_xlim(0, times[-1])
    top = max(max(b for _, b in run["timeline"]) for run in runs.values()) / 1e6
    axes[0].set_ylim(0, 1.3 * top)  # room for the phase names above the curves
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    axes[-1].set_xlabel("time into the step (ms)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_memory_growth(rows: list, title: str | None = None) -> Figure:
    """The training peak against the batch (left) and the resolution (right), one line per method:
    analytic (line) and measured (marker). ``rows``: the ``growth`` rows of
    ``benchmarks/training_memory.py`` (keys method, blocks, batch, resolution, axis, analytic,
    measured)."""
    if not rows:
        raise ValueError("no rows to plot")
    fig = Figure(figsize=(7.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    methods = list(dict.fromkeys((r["method"], r["blocks"]) for r in rows))
    for ax, axis, xlabel in zip(axes, ("batch", "resolution"), ("batch (224 x 224 images)",
                                                                 "resolution (pixels, batch 8)")):
        for i, (method, blocks) in enumerate(methods):
            mine = sorted((r for r in rows if r["axis"] == axis and r["method"] == method), key=lambda r: r[axis])
            x = [r[axis] for r in mine]
            color = f"C{i}"
            ax.plot(x, [r["analytic"]["bytes"] / 1e6 for r in mine], color=color, lw=1.2,
                    label=method_label(method, blocks))
            ax.plot(x, [r["measured"]["tensor_peak_bytes"] / 1e6 for r in mine], "o", color=color, ms=3.5)
        if axis == "batch":
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r[axis] for r in rows if r["axis"] == axis}))
        ax.xaxis.set_major_formatter("{x:.0f}")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0].set_ylabel("training peak (MB of tensors)")
    axes[1].legend(fontsize=7, loc="upper left", title="line: analytic, dot: measured", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
