"""The book's figures say what the package measures: the backward graph against saved-tensor
hooks, the block diagram against the profiler's rule table, layer names against the block."""
import pytest
import torch

from mobiletl_edu.measure import saved_activations
from mobiletl_edu.methods import prepare_block
from mobiletl_edu.plots import (backward_graph, layer_label, plot_backward_graph, plot_block_diagram,
                                saved_bytes)
from mobiletl_edu.profiler import build_block, profile_block


@pytest.mark.parametrize("kind", ["mbv2", "mbv3"])
@pytest.mark.parametrize("method", ["ft-blocks", "mobiletl"])
def test_backward_graph_keeps_what_autograd_keeps(kind, method):
    torch.manual_seed(0)
    block = prepare_block(build_block(kind, 16, 2, 3), method)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    graph = backward_graph(block, x)
    assert saved_bytes(graph) == saved_activations(block, x).total_bytes
    assert graph[0]["label"] == "residual add" and "input" in graph[0]["next"]


def test_backward_graph_puts_one_bit_masks_on_the_activations():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    graphs = {m: {e["label"]: e for e in backward_graph(prepare_block(build_block("mbv3", 16, 2, 3), m), x)}
              for m in ("ft-blocks", "mobiletl")}
    expanded = 2 * 32 * 5 * 5  # elements of one expanded map
    for layer in ("expand Hard-Swish", "depthwise Hard-Swish"):
        (mask,) = graphs["mobiletl"][layer]["saved"]
        assert mask[1] == torch.uint8 and mask[3] == expanded // 8
        (full,) = graphs["ft-blocks"][layer]["saved"]
        assert full[1] == torch.float32 and full[3] == 4 * expanded
    # shift-only BNs keep one number per channel and train only their shift
    assert graphs["mobiletl"]["expand BN"]["trains"] == ["bias"]
    assert graphs["mobiletl"]["expand BN"]["saved"][0][2] == (1, 32, 1, 1)
    assert sorted(graphs["mobiletl"]["project BN"]["trains"]) == ["bias", "weight"]


def test_layer_labels_name_what_each_layer_is():
    v3 = build_block("mbv3", 96, 6, 5)
    assert [layer_label(v3, n) for n in ("block.0.0", "block.0.1", "block.0.2", "block.1.0",
                                         "block.1.2", "block.2.fc1", "block.2", "block.3.0",
                                         "block.3.1", "")] == [
        "expand conv", "expand BN", "expand Hard-Swish", "depthwise conv", "depthwise Hard-Swish",
        "SE fc1", "SE scale × input", "project conv", "project BN", "residual add"]
    v2 = prepare_block(build_block("mbv2", 96, 1, 3), "mobiletl")  # an extra expand at ratio 1
    assert layer_label(v2, "block.0.2") == "expand ReLU6" and layer_label(v2, "block.2.1") == "project BN"
    assert layer_label(build_block("conv", 8, 1, 3), "1") == "BN"


def test_block_diagram_is_the_rule_table_applied():
    block = build_block("mbv3", 96, 6, 5)
    vanilla, ours = (profile_block("mbv3", m, expansion=6, convention="paper") for m in ("ft-blocks", "mobiletl"))
    texts = {t.get_text() for t in plot_block_diagram(block, vanilla, ours).axes[0].texts}
    for profile in (vanilla, ours):
        for layer in profile.layers:
            kept = "nothing" if not layer.activation_bytes else layer.stored
            assert any(t.startswith(kept) for t in texts), (layer.name, kept)
    assert "1-bit mask, 28.2 kB" in texts  # a sign mask of the 8 x 576 x 7 x 7 map
    with pytest.raises(ValueError, match="not of the same block"):
        plot_block_diagram(block, vanilla, profile_block("mbv2", "mobiletl", expansion=6))


def test_backward_graph_figure_has_one_panel_per_graph():
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    graphs = {m: backward_graph(prepare_block(build_block("mbv3", 16, 2, 3), m), x) for m in ("ft-blocks", "mobiletl")}
    fig = plot_backward_graph(graphs)
    assert [ax.get_title() for ax in fig.axes] == [
        f"{m}: autograd saves {saved_bytes(g) / 1e3:.1f} kB" for m, g in graphs.items()]
