"""`run.py prepare`: dataset converters, the ML-100K copy, text features and .pt imports."""

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import recbole
import torch

from recbole_ext.data import prepare
from recbole_ext.data.features import load_item_features
from recbole_ext.errors import UserError

ML100K_ITEM = Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.item"
SHARED = Path(
    os.environ.get("UR4REC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Misérables, Les (1995)::Drama|Musical\n"
    "3::Slingshot, The (Kådisbellan ) (1993)::Comedy|Drama\n"
    "4::Untitled Project::Documentary\n"
)
RATINGS = (
    "1::2::5::978300760\n"
    "1::1::3::978302109\n"
    "2::3::4::978301968\n"
    "2::1::1::978300275\n"
    "2::4::4::978824291\n"
)


def read_atomic(path):
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture
def official(tmp_path):
    (tmp_path / "movies.dat").write_bytes(MOVIES.encode("latin-1"))
    (tmp_path / "ratings.dat").write_text(RATINGS)
    return tmp_path


# ---------------------------------------------------------------- ML-1M, official files

def test_official_ml1m_becomes_recbole_atomic_files(official, capsys):
    out = official / "data"
    prepare.main(["ml1m", "--out", str(out), "--ratings", str(official / "ratings.dat"),
                  "--movies", str(official / "movies.dat")])

    inter = read_atomic(out / "ml-1m" / "ml-1m.inter")
    assert list(inter.columns) == ["user_id:token", "item_id:token", "timestamp:float"]
    assert len(inter) == 5
    assert inter.iloc[0].tolist() == ["1", "2", "978300760.0"]

    item_file = out / "ml-1m" / "ml-1m.item"
    lines = item_file.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq"
    assert lines[1:] == [
        "1\tToy Story\t1995\tAnimation Children's Comedy",
        "2\tMisérables, Les\t1995\tDrama Musical",
        "3\tSlingshot, The (Kådisbellan )\t1993\tComedy Drama",
        "4\tUntitled Project\t\tDocumentary",
    ]
    summary = capsys.readouterr().out
    assert "ml-1m.inter (5 rows)" in summary and "ml-1m.item (4 rows)" in summary


def test_min_rating_keeps_only_strong_ratings(official):
    prepare.convert_ml1m_official(official / "ratings.dat", official / "movies.dat", official, 4)
    inter = read_atomic(official / "ml-1m" / "ml-1m.inter")
    assert inter["item_id:token"].tolist() == ["2", "3", "4"]


def test_missing_inputs_are_user_errors_naming_the_path(official):
    with pytest.raises(UserError, match="nope.dat"):
        prepare.convert_ml1m_official(official / "nope.dat", official / "movies.dat", official)
    with pytest.raises(UserError, match="no_movies.dat"):
        prepare.write_ml1m_items(official / "no_movies.dat", official)
    with pytest.raises(UserError, match="--shared"):
        prepare.main(["ml1m", "--out", str(official), "--ratings", str(official / "ratings.dat")])


# ---------------------------------------------------------------- ML-1M, shared reconstruction

@pytest.fixture(scope="module")
def shared_ml1m(tmp_path_factory):
    src = SHARED / "ml-1m"
    if not (src / "ml-1m_interactions.tsv.gz").is_file():
        pytest.skip(f"shared ML-1M data not found at {src} (set UR4REC_SHARED_DATA)")
    out = tmp_path_factory.mktemp("shared")
    prepare.convert_ml1m_shared(src, out)
    inter = pd.read_csv(out / "ml-1m" / "ml-1m.inter", sep="\t", header=0,
                        names=["user", "item", "timestamp"], dtype={"user": str, "item": str})
    return src, out, inter


def test_shared_ml1m_keeps_every_interaction_in_time_order(shared_ml1m):
    src, out, inter = shared_ml1m
    assert len(inter) == 1_000_209
    assert inter["user"].nunique() == 6_040

    # RecBole orders each user's history by timestamp; that order must be the true one.
    ordered = inter.sort_values(["user", "timestamp"], kind="stable")
    got = ordered.groupby("user", sort=False)["item"].agg(list).to_dict()
    with gzip.open(src / "ml-1m_sequences_all.txt.gz", "rt") as f:
        expected = {u: items for u, *items in (line.split() for line in f)}
    assert got == expected
    assert len((out / "ml-1m" / "ml-1m.item").read_text().splitlines()) == 3_883 + 1


def test_shared_ml1m_filters(shared_ml1m, tmp_path):
    src = shared_ml1m[0]
    written = prepare.convert_ml1m_shared(src, tmp_path, min_rating=4)
    assert written[0].rows == 575_281
    with pytest.raises(UserError, match="--min-rating 3"):
        prepare.convert_ml1m_shared(src, tmp_path, min_rating=3)


# ---------------------------------------------------------------- ML-100K and text features

def test_copy_ml100k(tmp_path, capsys):
    prepare.main(["ml100k", "--out", str(tmp_path)])
    dst = tmp_path / "ml-100k"
    assert sorted(p.name for p in dst.iterdir()) == ["ml-100k.inter", "ml-100k.item", "prepare.sha256"]
    assert "(100,000 rows)" in capsys.readouterr().out


def test_item_texts_on_ml100k():
    ids, texts = prepare.item_texts(ML100K_ITEM)
    assert len(ids) == len(texts) == 1682
    assert ids[0] == "1"
    assert texts[0] == "Toy Story (1995) | Animation, Children's, Comedy"


def test_item_texts_use_whichever_columns_exist(tmp_path):
    item_file = tmp_path / "toy.item"
    item_file.write_text(
        "item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\n"
        "a\tHeat\t1995\tAction Crime\n"
        "b\tNo Year\t\tDrama\n"
        "c\tNo Genre\t2001\t\n"
    )
    assert prepare.item_texts(item_file) == (
        ["a", "b", "c"],
        ["Heat (1995) | Action, Crime", "No Year | Drama", "No Genre (2001)"],
    )
    (tmp_path / "bad.item").write_text("item_id:token\tname:token\n1\tx\n")
    with pytest.raises(UserError, match="bad.item"):
        prepare.item_texts(tmp_path / "bad.item")


def test_text_features_with_the_real_encoder(tmp_path):
    dataset = tmp_path / "toy"
    dataset.mkdir()
    (dataset / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Comedy\n"
        "2\tHeat\t1995\tAction Crime Thriller\n"
        "3\tSense and Sensibility\t1995\tDrama Romance\n"
    )
    out = tmp_path / "text.npz"
    prepare.build_text_features(dataset, out, batch_size=2)

    emb, available = load_item_features(out, ["[PAD]", "3", "2", "1"], width=384)
    assert emb.shape == (4, 384) and available.tolist() == [False, True, True, True]
    assert torch.allclose(emb[1:].norm(dim=1), torch.ones(3), atol=1e-4)
    assert (emb[2] @ emb[3]) < 0.95  # different titles, different vectors


# ---------------------------------------------------------------- original work's .pt files

@pytest.fixture
def toy_dataset(tmp_path):
    dataset = tmp_path / "toy"
    dataset.mkdir()
    (dataset / "toy.item").write_text("item_id:token\n1\n2\n3\n4\n")
    return dataset


def test_import_pt_round_trip(tmp_path, toy_dataset, capsys):
    tensor = torch.zeros(5, 3)  # row 0 padding, item 2 without a feature
    tensor[1], tensor[3], tensor[4] = 1.0, 3.0, 4.0
    torch.save({"features": tensor}, tmp_path / "clip_features.pt")
    out = tmp_path / "clip.npz"

    prepare.main(["import-pt", "--tensor", str(tmp_path / "clip_features.pt"),
                  "--dataset-dir", str(toy_dataset), "--out", str(out)])

    assert "clip.npz (3 rows)" in capsys.readouterr().out
    with np.load(out) as npz:
        assert npz["ids"].tolist() == ["1", "3", "4"]
    emb, available = load_item_features(out, ["[PAD]", "4", "2", "1", "3"], width=3)
    assert emb[:, 0].tolist() == [0.0, 4.0, 0.0, 1.0, 3.0]
    assert available.tolist() == [False, True, False, True, True]


def test_import_pt_errors_name_the_tensor(tmp_path, toy_dataset):
    out = tmp_path / "x.npz"
    flat = tmp_path / "flat.pt"
    torch.save(torch.ones(5), flat)
    with pytest.raises(UserError, match=r"flat\.pt.*2-D.*\(5,\)"):
        prepare.import_pt_features(flat, toy_dataset, out)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a tensor")
    with pytest.raises(UserError, match=r"garbage\.pt could not be read"):
        prepare.import_pt_features(garbage, toy_dataset, out)

    too_many = tmp_path / "too_many.pt"
    torch.save(torch.ones(8, 3), too_many)  # ids 1..7, the dataset has 1..4
    with pytest.raises(UserError, match=r"too_many\.pt.*3 id\(s\).*5, 6, 7"):
        prepare.import_pt_features(too_many, toy_dataset, out)

    with pytest.raises(UserError, match="absent.pt"):
        prepare.import_pt_features(tmp_path / "absent.pt", toy_dataset, out)
    assert not out.exists()


# ---------------------------------------------------------------- never replacing what prepare did not write

def refused(argv, capsys) -> str:
    import run
    assert run.main(["prepare", *argv]) == 2
    return " ".join(capsys.readouterr().err.split())


def test_ml100k_refuses_a_file_it_did_not_write_even_with_overwrite(tmp_path, capsys):
    mine = tmp_path / "ml-100k" / "ml-100k.item"
    mine.parent.mkdir()
    mine.write_bytes(b"my own item list\n")
    for extra in ([], ["--overwrite"]):
        err = refused(["ml100k", "--out", str(tmp_path), *extra], capsys)
        assert str(mine) in err and ("--overwrite" in err if not extra else "not written by prepare" in err)
        assert mine.read_bytes() == b"my own item list\n"
    assert not (tmp_path / "ml-100k" / "ml-100k.inter").exists()  # refused before any work


def test_overwrite_replaces_only_an_unchanged_file_prepare_wrote(tmp_path, capsys):
    prepare.main(["ml100k", "--out", str(tmp_path)])
    inter, item = tmp_path / "ml-100k" / "ml-100k.inter", tmp_path / "ml-100k" / "ml-100k.item"
    assert "already exists; give --overwrite" in refused(["ml100k", "--out", str(tmp_path)], capsys)
    before = inter.stat().st_mtime_ns
    prepare.main(["ml100k", "--out", str(tmp_path), "--overwrite"])
    assert inter.stat().st_mtime_ns != before
    item.write_bytes(item.read_bytes() + b"9999\tmy edit\n")
    edited = item.read_bytes()
    err = refused(["ml100k", "--out", str(tmp_path), "--overwrite"], capsys)
    assert f"{item}: not written by prepare, or changed since" in err
    assert item.read_bytes() == edited


def test_feature_outputs_are_kept_unless_prepare_wrote_them(tmp_path, toy_dataset, capsys):
    torch.save(torch.ones(5, 3), tmp_path / "clip_features.pt")
    argv = ["import-pt", "--tensor", str(tmp_path / "clip_features.pt"), "--dataset-dir", str(toy_dataset)]
    thesis = tmp_path / "thesis.npz"
    thesis.write_bytes(b"two years of work")
    for extra in ([], ["--overwrite"]):
        assert str(thesis) in refused([*argv, "--out", str(thesis), *extra], capsys)
    assert thesis.read_bytes() == b"two years of work"
    out = tmp_path / "clip.npz"
    prepare.main([*argv, "--out", str(out)])
    prepare.main([*argv, "--out", str(out), "--overwrite"])
    digests = dict(line.split("  ")[::-1] for line in (tmp_path / "prepare.sha256").read_text().splitlines())
    assert list(digests) == ["clip.npz"]  # the user's file is never recorded as prepare's


def test_a_conversion_cut_short_is_redone_with_overwrite(official, capsys):
    (official / "bad.dat").write_text("1::Toy Story (1995)\n")  # no genres: fails after ml-1m.inter is written
    argv = ["ml1m", "--out", str(official / "data"), "--ratings", str(official / "ratings.dat")]
    assert "bad.dat: line 1" in refused([*argv, "--movies", str(official / "bad.dat")], capsys)
    assert (official / "data" / "ml-1m" / "ml-1m.inter").is_file()
    prepare.main([*argv, "--movies", str(official / "movies.dat"), "--overwrite"])
    assert len(read_atomic(official / "data" / "ml-1m" / "ml-1m.item")) == 4


# ---------------------------------------------------------------- Amazon layout (user item item ... / item words)

def write_amazon(folder: Path, sequences: str, texts: str) -> tuple[Path, Path]:
    seq, text = folder / "Toy_user_sequence.txt.gz", folder / "Toy_item_text.txt"
    with gzip.open(seq, "wt", encoding="utf-8") as f:
        f.write(sequences)
    text.write_text(texts, encoding="utf-8")
    return seq, text


AMAZON_SEQ = "u1 B2 B1 B3\nu2 B3 B3 B4\n"
AMAZON_TEXT = "B1 sedu ionic   ceramic flat\nB2 nail lacquer\nB3\nB4 red polish\nB9 never bought\n"


def test_amazon_keeps_each_users_order_and_the_item_texts(tmp_path, capsys):
    seq, text = write_amazon(tmp_path, AMAZON_SEQ, AMAZON_TEXT)
    prepare.main(["amazon", "--sequences", str(seq), "--item-text", str(text), "--out", str(tmp_path / "data")])
    folder = tmp_path / "data" / "amazon-toy"
    inter = read_atomic(folder / "amazon-toy.inter")
    assert inter.values.tolist() == [["u1", "B2", "0.0"], ["u1", "B1", "1.0"], ["u1", "B3", "2.0"],
                                     ["u2", "B3", "0.0"], ["u2", "B3", "1.0"], ["u2", "B4", "2.0"]]
    items = read_atomic(folder / "amazon-toy.item")
    assert list(items.columns) == ["item_id:token", "title:token_seq"]
    # only items someone bought; whitespace collapsed; an item without words keeps an empty text
    assert items.values.tolist() == [["B2", "nail lacquer"], ["B1", "sedu ionic ceramic flat"], ["B3", ""],
                                     ["B4", "red polish"]]
    assert "amazon-toy.inter (6 rows)" in capsys.readouterr().out
    assert prepare.item_texts(folder / "amazon-toy.item")[1] == ["nail lacquer", "sedu ionic ceramic flat", "",
                                                                  "red polish"]


@pytest.mark.parametrize("sequences, texts, message", [
    ("u1 B1 B2\nu1 B3\n", AMAZON_TEXT, r"Toy_user_sequence.txt.gz, line 2: user 'u1' has a line already"),
    ("u1 B1\nu2\n", AMAZON_TEXT, r"Toy_user_sequence.txt.gz, line 2: expected 'user item item \.\.\.'"),
    ("u1 B1 B7\n", AMAZON_TEXT, r"Toy_user_sequence.txt.gz, line 1: item 'B7' has no line in the item text"),
    (AMAZON_SEQ, "B1 a\nB2 b\nB1 c\n", r"Toy_item_text.txt, line 3: item 'B1' is listed twice"),
    (AMAZON_SEQ, "B1\ta b\n", r"Toy_item_text.txt, line 1: a tab"),
])
def test_amazon_bad_lines_name_the_file_and_line(tmp_path, sequences, texts, message):
    seq, text = write_amazon(tmp_path, sequences, texts)
    with pytest.raises(UserError, match=message):
        prepare.main(["amazon", "--sequences", str(seq), "--item-text", str(text), "--out", str(tmp_path)])
    assert not (tmp_path / "amazon-toy").exists() or not any((tmp_path / "amazon-toy").glob("*.inter"))


def test_amazon_name_must_be_a_folder_name(tmp_path):
    seq, text = write_amazon(tmp_path, AMAZON_SEQ, AMAZON_TEXT)
    with pytest.raises(UserError, match="plain folder name"):
        prepare.main(["amazon", "--sequences", str(seq), "--item-text", str(text), "--name", "../x"])


def test_an_item_without_text_gets_no_feature_row(tmp_path):
    seq, text = write_amazon(tmp_path, AMAZON_SEQ, AMAZON_TEXT)
    prepare.convert_amazon(seq, text, tmp_path, "toy")
    prepare.build_text_features(tmp_path / "toy", tmp_path / "text.npz")
    emb, available = load_item_features(tmp_path / "text.npz", ["[PAD]", "B1", "B2", "B3", "B4"], width=384)
    assert available.tolist() == [False, True, True, False, True]


@pytest.mark.skipif(not (SHARED / "amazon-5core").is_dir(), reason="needs ../shared/data/amazon-5core")
def test_shared_amazon_beauty_has_the_published_counts(tmp_path):
    folder = SHARED / "amazon-5core"
    prepare.convert_amazon(folder / "Beauty_user_sequence.txt.gz", folder / "Beauty_item_text.txt.gz", tmp_path,
                           "amazon-beauty")
    inter = read_atomic(tmp_path / "amazon-beauty" / "amazon-beauty.inter")
    assert (len(inter), inter["user_id:token"].nunique(), inter["item_id:token"].nunique()) == (198_502, 22_363,
                                                                                              12_101)
