"""A table published in docs/ is what its command prints from the records committed beside it, and the
page quotes it unchanged: neither can drift from the data.

Each entry: a committed record, the Markdown the command printed when it wrote it, and the function
that prints that Markdown from the record alone."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, tables_in
from recbole_ext.analysis import compare, curves, report, results

# records folder -> the page that quotes its tables
PAGES = {ROOT / "docs" / "results" / "federation-gap": ROOT / "docs" / "FEDERATION.md",
         ROOT / "docs" / "results" / "amazon-beauty-backbone": ROOT / "docs" / "RESULTS-BEAUTY.md"}


def reprint(record) -> str:
    data = json.loads(record.read_text())
    if record.name.endswith("-curves.json"):
        return curves.table(data)
    if "compare-" in record.name:
        return compare.markdown(data["rows"], data["run_a"], data["run_b"], data["split"], data["bootstrap"])
    return results.tables(data)


PUBLISHED = sorted(record for folder in PAGES if folder.is_dir() for record in folder.glob("*.json"))


@pytest.mark.parametrize("folder", sorted(PAGES))
def test_there_are_published_tables(folder):
    assert list(folder.glob("*.json")), f"{folder}: no records"


@pytest.mark.parametrize("record", PUBLISHED, ids=lambda r: f"{r.parent.name}/{r.name}")
def test_a_published_table_is_its_records_reprinted_and_quoted_on_its_page(record):
    printed = record.with_suffix(".md").read_text().strip()
    assert reprint(record).strip() == printed, f"{record.name}: the committed table is not what its record prints"
    page = PAGES[record.parent]
    quoted = tables_in(page.read_text())  # whole tables: a row added by hand fails too
    for table in tables_in(printed):
        assert table in quoted, f"{page.name} does not quote this table of {record.name} unchanged:\n{table}"


def test_the_readme_demo_table_is_its_record_reprinted():
    records = json.loads((ROOT / "docs" / "results" / "demo" / "demo.json").read_text())
    assert [r["name"] for r in records] == ["baseline-pop", "demo-stage1", "demo-stage2", "demo-stage3"]
    assert report.table(records) in (ROOT / "README.md").read_text(), \
        "README.md does not quote what `run.py report` prints from docs/results/demo/demo.json"
