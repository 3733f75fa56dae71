"""Figures for the book, drawn from profiles (``mobiletl_edu.profiler``).

Each helper returns a ``matplotlib.figure.Figure`` built without pyplot, so it works in a
notebook, a script or a test alike and leaves no global state behind.
"""
from __future__ import annotations

from matplotlib.figure import Figure

from .profiler import Profile


def plot_finetuning_sweep(sweep: dict, title: str | None = None) -> Figure:
    """Figure 4: forward and backward MFLOPs (bars, left axis) and stored activations (line, right).

    ``sweep`` maps a setting's label (FT-Last, FT-1-BLKs, ..., FT-All) to its Profile, in the
    order to plot, as ``profiler.finetuning_sweep`` returns it.
    """
    if not sweep:
        raise ValueError("the sweep is empty: nothing to plot")
    labels, profiles = list(sweep), list(sweep.values())
    x = range(len(labels))
    fig = Figure(figsize=(max(6.0, 0.55 * len(labels)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.4
    ax.bar([i - width / 2 for i in x], [p.forward_flops / 1e6 for p in profiles], width, label="forward")
    ax.bar([i + width / 2 for i in x], [p.backward_flops / 1e6 for p in profiles], width, label="backward")
    ax.set_xticks(list(x), labels, rotation=60, ha="right")
    ax.set_ylabel("MFLOPs")
    memory = ax.twinx()
    memory.plot(list(x), [p.mb(p.activation_bytes) for p in profiles], "o-", color="black",
                label="stored activations")
    memory.set_ylabel("stored activations (MB)")
    memory.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + memory.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
    ax.set_title(title or f"FLOPs and memory against the number of fine-tuned blocks "
                          f"(convention {profiles[0].convention.name!r})")
    return fig


def plot_block_activations(vanilla: Profile, mobiletl: Profile, title: str | None = None) -> Figure:
    """Figure 1: stored activations per layer of one block, vanilla fine-tuning against MobileTL.

    Both profiles must be of the same block (``profiler.profile_block`` with ``ft-blocks`` and
    ``mobiletl``): MobileTL replaces layers in place, so their names match. Layers that store
    nothing in either are left out.
    """
    names = [layer.name for layer in vanilla.layers]
    if names != [layer.name for layer in mobiletl.layers]:
        raise ValueError("the two profiles are not of the same block: their layer names differ")
    shown = [i for i, (a, b) in enumerate(zip(vanilla.layers, mobiletl.layers))
             if a.activation_bytes or b.activation_bytes]
    names = [names[i] for i in shown]
    kinds = [_short(vanilla.layers[i].rule) for i in shown]
    x = range(len(names))
    fig = Figure(figsize=(max(6.0, 0.6 * len(names)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.4
    for offset, profile, label in ((-width / 2, vanilla, "vanilla"), (width / 2, mobiletl, "MobileTL")):
        ax.bar([i + offset for i in x], [vanilla.mb(profile.layers[i].activation_bytes) for i in shown],
               width, label=f"{label}: {profile.mb(profile.activation_bytes):.3f} MB")
    ax.set_xticks(list(x), [f"{n or 'block'}\n{k}" for n, k in zip(names, kinds)], rotation=60, ha="right",
                  fontsize=8)
    ax.set_ylabel("stored for backward (MB)")
    saved = 1 - mobiletl.activation_bytes / vanilla.activation_bytes if vanilla.activation_bytes else 0.0
    ax.legend(title=f"{100 * saved:.1f} % less with MobileTL", loc="upper left", bbox_to_anchor=(1.01, 1),
              borderaxespad=0)
    ax.set_title(title or f"Stored activations per layer (convention {vanilla.convention.name!r})")
    return fig


def _short(rule: str) -> str:
    return rule.split(" (")[0].split(",")[0]


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
