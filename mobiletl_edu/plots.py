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
