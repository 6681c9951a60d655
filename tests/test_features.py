"""Feature files are aligned to RecBole's internal item ids, and broken files name themselves."""

import numpy as np
import pytest
import torch

from recbole_ext.data.features import load_item_features, read_item_tokens, save_item_features
from recbole_ext.errors import UserError

TOKENS = ["[PAD]", "10", "20", "30", "40"]  # internal id -> raw token, as RecBole builds it


def write_npz(path, ids, emb, **extra):
    np.savez(path, ids=np.asarray(ids), emb=np.asarray(emb), **extra)
    return path


def test_permuted_file_with_a_missing_item_is_aligned_by_token(tmp_path):
    # File order differs from internal order, and item '20' has no feature row.
    emb = np.array([[3.0, 3.0], [1.0, 1.0], [4.0, 4.0]])
    path = write_npz(tmp_path / "f.npz", ["30", "10", "40"], emb)

    out, available = load_item_features(path, TOKENS, width=2)

    assert out.dtype == torch.float32 and out.shape == (5, 2)
    assert out.tolist() == [[0, 0], [1, 1], [0, 0], [3, 3], [4, 4]]
    assert available.tolist() == [False, True, False, True, True]


def test_integer_ids_and_float16_values_are_accepted(tmp_path):
    emb = np.array([[0.5, -0.25], [1.5, 2.0]], dtype=np.float16)
    path = write_npz(tmp_path / "f.npz", np.array([40, 10]), emb)

    out, available = load_item_features(path, TOKENS, width=2)

    assert out.dtype == torch.float32
    assert out[1].tolist() == [1.5, 2.0] and out[4].tolist() == [0.5, -0.25]
    assert available.tolist() == [False, True, False, False, True]


def test_ids_known_only_from_the_item_file_are_dropped(tmp_path):
    # '99' is listed in the dataset's .item file but never interacted with, so RecBole has no id.
    path = write_npz(tmp_path / "f.npz", ["10", "99"], np.ones((2, 2)))

    out, available = load_item_features(path, TOKENS, width=2, extra_known_tokens=["99", "10"])

    assert available.tolist() == [False, True, False, False, False]
    assert out.sum() == 2


@pytest.mark.parametrize(
    "ids, emb, width, expected",
    [
        (["10", "20"], [[0.0, np.nan], [1.0, 1.0]], 2, ["NaN or infinity in 1 row", "'10'"]),
        (["10", "20", "30"], [[1, 1], [np.inf, 0], [-np.inf, 0]], 2, ["2 row", "'20'"]),
        (["10"], [[1.0, 2.0, 3.0]], 2, ["2 columns", "(1, 3)"]),
        (["10"], [1.0, 2.0], 2, ["2-D", "(2,)"]),
        (["10", "20", "10"], np.ones((3, 2)), 2, ["'10' more than once"]),
        (["10", "77", "88"], np.ones((3, 2)), 2, ["2 id(s)", "'77'", "'88'"]),
        (["[PAD]"], np.ones((1, 2)), 2, ["1 id(s)", "'[PAD]'"]),
    ],
    ids=["nan", "inf", "wrong-width", "not-2d", "duplicate", "unknown", "pad-row"],
)
def test_bad_files_are_user_errors_that_name_the_file(tmp_path, ids, emb, width, expected):
    path = write_npz(tmp_path / "bad.npz", ids, emb)
    with pytest.raises(UserError) as err:
        load_item_features(path, TOKENS, width=width)
    assert str(path) in str(err.value)
    for text in expected:
        assert text in str(err.value)


def test_missing_file_missing_key_and_non_npz_are_user_errors(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(UserError, match="does not exist") as err:
        load_item_features(missing, TOKENS, width=2)
    assert str(missing) in str(err.value)

    no_emb = tmp_path / "no_emb.npz"
    np.savez(no_emb, ids=np.array(["10"]), vectors=np.ones((1, 2)))
    with pytest.raises(UserError, match="'emb'") as err:
        load_item_features(no_emb, TOKENS, width=2)
    assert str(no_emb) in str(err.value)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="not a readable .npz") as err:
        load_item_features(garbage, TOKENS, width=2)
    assert str(garbage) in str(err.value)


def test_saved_file_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "dir" / "f.npz"
    save_item_features(path, [30, 10], np.array([[3.0, 3.0], [1.0, 1.0]], dtype=np.float64))

    assert sorted(p.name for p in path.parent.iterdir()) == ["f.npz"]
    with np.load(path) as npz:
        assert npz["ids"].dtype.kind == "U" and npz["emb"].dtype == np.float32
    out, available = load_item_features(path, TOKENS, width=2)
    assert out[3].tolist() == [3.0, 3.0] and available.sum() == 2


def test_item_tokens_come_from_the_item_file(tmp_path):
    item_file = tmp_path / "toy.item"
    item_file.write_text('item_id:token\ttitle:token_seq\n7\t"Quoted" Title\n3\tOther\n')
    assert read_item_tokens(item_file) == ["7", "3"]
    assert read_item_tokens(tmp_path / "absent.item") == []
