"""A pybtex style whose bibliography labels read like the book's citations: "Chiang et al., 2023".

The text cites author-year (``bibtex_reference_style: author_year``); pybtex's default labels
are alphabetic ("[CFLM23]"), so a reader could not match a citation to its entry. This Sphinx
extension registers the style ``authoryear``: pybtex's ``unsrt`` formatting, entries sorted
by author, year and title, and labels built from the surnames and the year as the text does.
"""
from __future__ import annotations

from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle


def _surname(person) -> str:
    return " ".join(person.prelast_names + person.last_names).replace("{", "").replace("}", "")


class AuthorYearLabels(BaseLabelStyle):
    """One surname, two joined by "and", three or more as "First et al.", then the year."""

    def format_labels(self, sorted_entries):
        labels = [self._label(entry) for entry in sorted_entries]
        total, seen = Counter(labels), Counter()
        for label in labels:  # two works with one label: 2020a, 2020b
            suffix = chr(ord("a") + seen[label]) if total[label] > 1 else ""
            seen[label] += 1
            yield label + suffix

    @staticmethod
    def _label(entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_surname(p) for p in people]
        if not names:
            who = entry.fields.get("key", entry.key)
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabels
    default_sorting_style = SortingStyle


def setup(app):
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
