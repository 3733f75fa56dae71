"""markdown_table: the one helper the book's pages use for tables."""
import pytest

from mobiletl_edu.tables import markdown_table


def test_markdown_table_renders_header_rule_and_rows():
    table = markdown_table(["a", "b"], [[1, "x|y"], [2.5, "$z$"]], "lr")
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| 1 | x\\|y |", "| 2.5 | $z$ |"]
    assert table._repr_markdown_() == str(table)  # a notebook displays it as Markdown


@pytest.mark.parametrize("align", ["l", "lrx"])
def test_markdown_table_rejects_bad_alignment(align):
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], [], align)


def test_markdown_table_rejects_a_short_row():
    with pytest.raises(ValueError, match="1 values for 2 columns"):
        markdown_table(["a", "b"], [[1]])
