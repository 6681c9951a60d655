"""docs/BENCHMARKS.md quotes each benchmark's tables as its `--table` command prints them from the
record committed beside the page, so a table cannot drift from its data."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT, tables_in

DOCS = ROOT / "docs"
PAGE = DOCS / "BENCHMARKS.md"
# record -> (script in benchmarks/, its function that prints the record's tables for `--table`)
PRINTERS = {
    "benchmarks-cpu.json": ("federated_round", "markdown"),
    "benchmarks-cpu-ml1m.json": ("federated_round", "markdown"),
    "benchmarks-gpu.json": ("federated_round", "markdown"),
    "benchmarks-pooled-round.json": ("pooled_round", "table"),
    "benchmarks-flower.json": ("flower_round", "table"),
    "benchmarks-test-suite.json": ("test_suite", "table"),
}
# The page quotes these in its prose, in no table.
PROSE_ONLY = {"benchmarks-client-memory.json", "soak-cpu.json"}


def printed(record: str) -> str:
    script, function = PRINTERS[record]
    spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)(json.loads((DOCS / record).read_text()))


def test_every_benchmark_record_is_printed_or_quoted_in_prose():
    records = {p.name for p in DOCS.glob("*.json")}
    assert records == set(PRINTERS) | PROSE_ONLY


@pytest.mark.parametrize("record", sorted(PRINTERS))
def test_the_page_quotes_every_table_its_record_prints(record):
    page = tables_in(PAGE.read_text())
    tables = tables_in(printed(record))
    assert tables
    for table in tables:
        # Equal to one of the page's tables, not inside one: a row added by hand fails too.
        assert table in page, f"{PAGE.name} does not quote this table of {record} unchanged:\n{table}"
