"""A table published in docs/ is what its command prints from the records committed beside it, and the
page quotes it unchanged: neither can drift from the data.

Each entry: a committed record, the Markdown the command printed when it wrote it, and the function
that prints that Markdown from the record alone."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, tables_in
from recbole_ext.analysis import compare, curves, report, results

RECORDS = ROOT / "docs" / "results" / "federation-gap"
PAGE = ROOT / "docs" / "FEDERATION.md"


def reprint(record: str) -> str:
    data = json.loads((RECORDS / record).read_text())
    if record.endswith("-curves.json"):
        return curves.table(data)
    if "-compare-" in record:
        return compare.markdown(data["rows"], data["run_a"], data["run_b"], data["split"], data["bootstrap"])
    return results.tables(data)


PUBLISHED = sorted(p.name for p in RECORDS.glob("*.json")) if RECORDS.is_dir() else []


def test_there_are_published_tables():
    assert PUBLISHED, f"{RECORDS}: no records"


@pytest.mark.parametrize("record", PUBLISHED)
def test_a_published_table_is_its_records_reprinted_and_quoted_on_its_page(record):
    printed = (RECORDS / record.replace(".json", ".md")).read_text().strip()
    assert reprint(record).strip() == printed, f"{record}: the committed table is not what its record prints"
    page = tables_in(PAGE.read_text())  # whole tables: a row added by hand fails too
    for table in tables_in(printed):
        assert table in page, f"{PAGE.name} does not quote this table of {record} unchanged:\n{table}"


def test_the_readme_demo_table_is_its_record_reprinted():
    records = json.loads((ROOT / "docs" / "results" / "demo" / "demo.json").read_text())
    assert [r["name"] for r in records] == ["baseline-pop", "demo-stage1", "demo-stage2", "demo-stage3"]
    assert report.table(records) in (ROOT / "README.md").read_text(), \
        "README.md does not quote what `run.py report` prints from docs/results/demo/demo.json"
