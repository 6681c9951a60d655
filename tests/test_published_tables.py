"""A table published in docs/ is what its command prints from the records committed beside it, and the
page quotes it unchanged: neither can drift from the data.

Each entry: the Markdown a command printed when it wrote a committed record, and the function that
prints that Markdown from the record alone; an attack table (`attack-NAME.md`) is printed from the
attack records `attack-NAME-*.json` together (`run.py attack --records`)."""
from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, tables_in
from recbole_ext.analysis import attack, compare, curves, report, results

# records folder -> the page that quotes its tables
PAGES = {ROOT / "docs" / "results" / "federation-gap": ROOT / "docs" / "FEDERATION.md",
         ROOT / "docs" / "results" / "amazon-beauty-backbone": ROOT / "docs" / "RESULTS-BEAUTY.md",
         ROOT / "docs" / "results" / "ml1m-backbone": ROOT / "docs" / "RESULTS-ML1M.md",
         ROOT / "docs" / "results" / "privacy": ROOT / "docs" / "PRIVACY.md",
         ROOT / "docs" / "results" / "tuning-ml1m": ROOT / "docs" / "TUNING.md",
         ROOT / "docs" / "results" / "tuning-beauty": ROOT / "docs" / "TUNING.md",
         ROOT / "docs" / "results" / "ml1m-stage2-choice": ROOT / "docs" / "TUNING.md"}


def reprint(printed) -> str:
    if printed.name.startswith("attack-"):
        records = sorted(printed.parent.glob(f"{printed.stem}-*.json"))
        assert records, f"{printed.name}: no attack records {printed.stem}-*.json beside it"
        return attack.table([json.loads(r.read_text()) for r in records])
    record = printed.with_suffix(".json")
    data = json.loads(record.read_text())
    if record.name.endswith("-curves.json"):
        return curves.table(data)
    if "compare-" in record.name:
        return compare.markdown(data["rows"], data["run_a"], data["run_b"], data["split"], data["bootstrap"])
    return results.tables(data)


PUBLISHED = sorted(printed for folder in PAGES if folder.is_dir() for printed in folder.glob("*.md"))


@pytest.mark.parametrize("folder", sorted(PAGES))
def test_there_are_published_tables(folder):
    assert list(folder.glob("*.json")), f"{folder}: no records"


@pytest.mark.parametrize("printed", PUBLISHED, ids=lambda r: f"{r.parent.name}/{r.name}")
def test_a_published_table_is_its_records_reprinted_and_quoted_on_its_page(printed):
    assert reprint(printed).strip() == printed.read_text().strip(), \
        f"{printed.name}: the committed table is not what its records print"
    page = PAGES[printed.parent]
    quoted = tables_in(page.read_text())  # whole tables: a row added by hand fails too
    for table in tables_in(printed.read_text()):
        assert table in quoted, f"{page.name} does not quote this table of {printed.name} unchanged:\n{table}"


def test_every_record_has_its_printed_table():
    for folder in PAGES:
        for record in folder.glob("*.json"):
            stem = record.stem.rsplit("-", 1)[0] if record.name.startswith("attack-") else record.stem
            assert (folder / f"{stem}.md").is_file(), f"{record}: no table printed from it ({stem}.md)"


def test_the_readme_demo_table_is_its_record_reprinted():
    records = json.loads((ROOT / "docs" / "results" / "demo" / "demo.json").read_text())
    assert [r["name"] for r in records] == ["baseline-pop", "demo-stage1", "demo-stage2", "demo-stage3"]
    assert report.table(records) in (ROOT / "README.md").read_text(), \
        "README.md does not quote what `run.py report` prints from docs/results/demo/demo.json"


def test_results_beauty_quotes_the_seed_table_of_the_earlier_backbone():
    """docs/RESULTS-BEAUTY.md's earlier backbone is given by the seed table `run.py results` printed when
    it wrote docs/results/amazon-beauty.json, reprinted from that record and quoted unchanged."""
    records = json.loads((ROOT / "docs" / "results" / "amazon-beauty.json").read_text())
    [table] = tables_in(results.markdown_table(records))
    assert table in tables_in((ROOT / "docs" / "RESULTS-BEAUTY.md").read_text()), \
        "RESULTS-BEAUTY.md does not quote the seed table of docs/results/amazon-beauty.json unchanged"


def interval(row: dict) -> str:
    """A compare record's row as the pages write a difference: +0.0010 [−0.0005, +0.0025]."""
    return f"{row['difference']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]".replace("-", "−")


# A paired interval as the pages write one: two signed numbers in brackets, [−0.0005, +0.0025]. The
# closing bracket is not required ("[−0.0417, −0.0178 for the difference]" is one too) and a line may
# break after the comma; a pair without signs (a YAML list such as `[0.05, 0.1]`) is not an interval.
SIGNED = r"[+\-−]\d+\.\d+"
INTERVAL = re.compile(rf"\[\s*({SIGNED}),\s*({SIGNED})")
RESULT_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMPARE_RECORDS = sorted((ROOT / "docs" / "results").glob("**/*compare-*.json"))


def interval_bounds(text: str) -> list[tuple[re.Match, tuple[str, str]]]:
    """Each interval in `text` with its (low, high), the minus sign written as '-'."""
    return [(m, (m[1].replace("−", "-"), m[2].replace("−", "-"))) for m in INTERVAL.finditer(text)]


@pytest.mark.parametrize("text, bounds", [
    ("+0.0036 [+0.0022, +0.0050] (+12.2%)", [("+0.0022", "+0.0050")]),
    ("0.2442 to 0.2148 [−0.0417, −0.0178 for the difference]", [("-0.0417", "-0.0178")]),
    ("+0.0011 [-0.0015,\n+0.0036]", [("-0.0015", "+0.0036")]),
    ("`[0.05, 0.1]`, [95% CI], [CI of B − A], [0.05, +0.1]", [])])
def test_an_interval_is_two_signed_numbers_in_brackets(text, bounds):
    assert [b for _, b in interval_bounds(text)] == bounds


def test_every_paired_interval_on_a_page_is_in_a_committed_compare_record():
    """A paired interval published on a page is one that a committed compare record holds (any row of
    any docs/results/**/*compare-*.json, to the four decimals the pages print): an interval computed from
    per-user files that were not committed cannot be checked, and is not published."""
    assert COMPARE_RECORDS, "no compare records in docs/results/"
    recorded = {(f"{row['ci_low']:+.4f}", f"{row['ci_high']:+.4f}")
                for record in COMPARE_RECORDS for row in json.loads(record.read_text())["rows"]}
    unrecorded = []
    for page in RESULT_PAGES:
        text = page.read_text()
        unrecorded += [f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: [{m[1]}, {m[2]}]"
                       for m, bounds in interval_bounds(text) if bounds not in recorded]
    assert not unrecorded, f"{len(unrecorded)} intervals on the pages are in no committed compare record:\n" \
        + "\n".join(unrecorded)


@pytest.mark.parametrize("dataset, columns, best", [("ml1m", (0, 1), "a22e3_00002"), ("beauty", (2, 3), "94bce_00001")])
def test_tuning_md_default_and_best_columns_are_their_records(dataset, columns, best):
    """docs/TUNING.md's table of the stage-2 defaults against the sweep's best: each dataset's two
    columns are what the records in docs/results/tuning-DATASET/ hold."""
    folder = ROOT / "docs" / "results" / f"tuning-{dataset}"
    [table] = [t for t in tables_in((ROOT / "docs" / "TUNING.md").read_text()) if t.startswith("| | ML-1M default |")]
    rows = {line.split("|")[1].strip(): [line.split("|")[2 + c].strip() for c in columns]
            for line in table.splitlines()[2:]}

    def run(name: str) -> dict:
        records = json.loads((folder / f"{dataset}-stage2-{name}.json").read_text())
        return {(r["split"], r["protocol"]): r for r in records}

    def overall_ndcg(name: str) -> str:
        [row] = [r for r in json.loads((folder / f"compare-{dataset}-{name}.json").read_text())["rows"]
                 if r["slice"] == "overall" and (r["protocol"], r["metric"]) == ("full", "ndcg@10")]
        return interval(row)

    pair = lambda m: f"{m['hit@10']:.4f} / {m['ndcg@10']:.4f}"
    for column, records in enumerate((run("default"), run(best))):
        test = records["test", "full"]
        assert rows["best round (valid)"][column] == str(test["best_round"])
        assert rows["valid full NDCG@10"][column] == f"{records['valid', 'full']['metrics']['ndcg@10']:.4f}"
        assert rows["test full HR@10 / NDCG@10"][column] == pair(test["metrics"])
        assert rows["test uni100 HR@10 / NDCG@10"][column] == pair(records["test", "uni100"]["metrics"])
        assert rows["wall time"][column] == f"{test['wall_seconds']:,.0f} s"
    assert rows["test full NDCG@10, best − default"][1] == overall_ndcg("stage2-default-best")
    assert rows["test full NDCG@10, − stage 1 on the same users"] == [
        overall_ndcg("stage1-stage2-default"), overall_ndcg("stage1-stage2-best")]


@pytest.mark.parametrize("seed", ["2020", "2021", "2022"])
def test_tuning_md_stage3_table_rows_are_their_records(seed):
    """docs/TUNING.md's per-seed paired table of the stage 3 on the default and on the best stage 2:
    each row of a seed is what its record in docs/results/ml1m-stage2-choice/ holds."""
    folder = ROOT / "docs" / "results" / "ml1m-stage2-choice"
    [table] = [t for t in tables_in((ROOT / "docs" / "TUNING.md").read_text())
               if t.startswith("| test, B − A | seed |")]
    columns = [("overall", "full", "hit@10"), ("overall", "full", "ndcg@10"), ("overall", "uni100", "ndcg@10"),
               ("item 10-49", "full", "ndcg@10"), ("item 10-49", "uni100", "ndcg@10")]
    records = {"stage 3 on best − stage 3 on default": "stage3_ce-stage3_ce_tuned",
               "stage 3 on default − stage 1": "stage1_ce-stage3_ce",
               "stage 3 on best − stage 1": "stage1_ce-stage3_ce_tuned"}
    ours, label = {}, None
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        label = cells[0] or label  # a comparison's first row names it, the seeds after it leave it blank
        if cells[1] == seed:
            ours[label] = cells[2:]
    assert set(ours) == set(records)
    for label, name in records.items():
        compared = json.loads((folder / f"compare-{name}-seed{seed}.json").read_text())["rows"]
        expected = []
        for slice_, protocol, metric in columns:
            [row] = [r for r in compared if (r["slice"], r["protocol"], r["metric"]) == (slice_, protocol, metric)]
            expected.append(interval(row))
        assert ours[label] == expected, label
