"""Item feature files (`.npz`: `ids` = raw item tokens, `emb` = float matrix [n, D]).

RecBole renumbers items internally (row 0 is `[PAD]`), while feature files are keyed by the raw
item token, so every file is aligned through the token list before a model sees it. Items without a
feature row get a zero vector and `available=False`, so the model can tell "no image" from "a black
image". Anything a broken file could silently corrupt (NaN, infinity, wrong width, duplicate or
unknown ids) is a `UserError` that names the file.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from recbole_ext.errors import UserError
from recbole_ext.runs import atomic_write

_SHOW = 5  # how many offending ids an error message lists


def load_item_features(
    path: str | os.PathLike,
    item_tokens: Sequence[str],
    width: int,
    extra_known_tokens: Iterable[str] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a feature file aligned to RecBole internal item ids.

    `item_tokens[i]` is the raw token of internal id `i` (`item_tokens[0]` is `'[PAD]'`, as in
    `dataset.field2id_token['item_id']`). Returns `(emb, available)`: float32 `[len(item_tokens),
    width]` and bool `[len(item_tokens)]`. Row 0 is zero and unavailable.

    Ids found in `extra_known_tokens` but not in `item_tokens` are dropped silently: they are items
    listed in the dataset's `.item` file that nobody interacted with, which RecBole leaves out.
    Any other id the dataset does not know is an error: it usually means the file belongs to
    another dataset or id scheme, and dropping it would quietly train on zero vectors.
    """
    ids, emb = _read_npz(path, width)

    tokens = np.asarray(item_tokens, dtype=str)
    # The PAD token is left out of the index on purpose: a file row named '[PAD]' is unknown.
    pos = pd.Index(tokens[1:]).get_indexer(ids)
    unknown = pos < 0
    if unknown.any():
        extra = pd.Index(np.asarray(list(extra_known_tokens), dtype=str))
        really_unknown = ids[unknown][extra.get_indexer(ids[unknown]) < 0]
        if len(really_unknown):
            shown = ", ".join(repr(t) for t in really_unknown[:_SHOW].tolist())
            raise UserError(
                f"Feature file {path} has {len(really_unknown)} id(s) that are not items of the "
                f"dataset (first ones: {shown}). Check that the file was built for this dataset "
                f"and uses its raw item tokens as ids."
            )

    keep = ~unknown
    out = np.zeros((len(tokens), width), dtype=np.float32)
    out[pos[keep] + 1] = emb[keep]
    available = np.zeros(len(tokens), dtype=bool)
    available[pos[keep] + 1] = True
    return torch.from_numpy(out), torch.from_numpy(available)


def _read_npz(path: str | os.PathLike, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate `ids` (as str) and `emb` (as float32) from a feature file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Feature file {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("ids", "emb") if k not in npz.files]
            if missing:
                raise UserError(
                    f"Feature file {path} lacks the key(s) {missing}; it has {sorted(npz.files)}. "
                    f"A feature file needs 'ids' (raw item tokens) and 'emb' (float matrix)."
                )
            ids, emb = npz["ids"], npz["emb"]
    except UserError:
        raise
    except Exception as e:  # np.load raises many types (BadZipFile, ValueError, OSError, ...)
        raise UserError(
            f"Feature file {path} is not a readable .npz file ({type(e).__name__}: {e})."
        ) from e

    if ids.dtype.kind not in "iuUS":
        raise UserError(
            f"Feature file {path}: 'ids' must hold strings or integers, found dtype {ids.dtype}."
        )
    ids = ids.astype(str)
    if emb.ndim != 2 or emb.shape[1] != width:
        raise UserError(
            f"Feature file {path}: 'emb' should be a 2-D matrix with {width} columns, "
            f"found shape {emb.shape}. Check the feature width in the config."
        )
    if emb.dtype.kind not in "fiu":
        raise UserError(f"Feature file {path}: 'emb' must be numeric, found dtype {emb.dtype}.")
    if ids.ndim != 1 or len(ids) != len(emb):
        raise UserError(
            f"Feature file {path}: 'ids' has shape {ids.shape} but 'emb' has {len(emb)} rows; "
            f"there must be one id per row."
        )

    # Checked after the cast so float64 values too large for float32 are caught as infinity.
    emb = emb.astype(np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise UserError(
            f"Feature file {path} has NaN or infinity in {int(bad.sum())} row(s); the first is "
            f"id {str(ids[bad][0])!r}. Rebuild the features or drop those rows."
        )
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise UserError(
            f"Feature file {path} lists id {str(ids[dup][0])!r} more than once "
            f"({int(dup.sum())} duplicate row(s)); each item may have one feature row."
        )
    return ids, emb


def save_item_features(path: str | os.PathLike, ids: Sequence, emb: np.ndarray) -> Path:
    """Write a feature file: `ids` as a numpy str array, `emb` as float32.

    Written to a temporary file next to the target and renamed, so a crash never leaves a
    truncated file that a later run would half-read.
    """
    path = Path(path)
    ids = np.asarray(ids).astype(str)
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"need one id per row of a 2-D emb, got {len(ids)} ids and {emb.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
            np.savez(f, ids=ids, emb=emb)

    atomic_write(path, write)
    return path


def read_atomic_file(
    path: str | os.PathLike, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read a RecBole atomic file as strings, with columns renamed from `name:type` to `name`.

    `columns` (names without the type) restricts what is read, which matters for large `.inter`s.

    Quoting is off because titles may contain quote characters that are text, not CSV quoting.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Atomic file {path} does not exist.")
    usecols = None if columns is None else (lambda c: c.split(":", 1)[0] in columns)
    df = pd.read_csv(
        path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
        encoding="utf-8", usecols=usecols,
    )
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def read_item_tokens(atomic_item_file: str | os.PathLike) -> list[str]:
    """Raw item tokens listed in a dataset's `.item` file, or [] if it has none.

    Used as `extra_known_tokens`: feature files are built from the `.item` file and so cover
    items that never occur in the interactions.
    """
    if not Path(atomic_item_file).is_file():
        return []
    df = read_atomic_file(atomic_item_file, columns=["item_id"])
    if "item_id" not in df.columns:
        raise UserError(
            f"Item file {atomic_item_file} has no 'item_id:token' column; "
            f"its header is {list(df.columns)}."
        )
    return df["item_id"].tolist()
