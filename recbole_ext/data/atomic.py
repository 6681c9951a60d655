"""Checks on a dataset's interaction file before RecBole reads it.

RecBole turns a malformed line into a pandas stack trace (or silently into NaN), and a user with
fewer than three interactions into an empty training or validation sample; here each becomes one
message naming the file, the line and the user.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import UserError
from .features import read_atomic_file

REQUIRED = {"user_id": "token", "item_id": "token", "timestamp": "float"}
MIN_INTERACTIONS = 3  # leave-one-out: at least one training target, one validation, one test


def check_interactions(path) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    header = lines[0].split("\t") if lines else []
    widths = np.fromiter((line.count("\t") for line in lines), dtype=np.int64, count=len(lines))
    bad = np.flatnonzero(widths != len(header) - 1)
    if len(bad):
        raise UserError(f"{path}: malformed interaction file: line {bad[0] + 1} has {widths[bad[0]] + 1} "
                        f"fields, the header {len(header)} ({len(bad)} such lines)")
    declared = dict(field.split(":", 1) if ":" in field else (field, "?") for field in header)
    for name, kind in REQUIRED.items():
        if declared.get(name) != kind:
            raise UserError(f"{path}: the header must declare {name}:{kind} (found: {' '.join(header)})")
    frame = read_atomic_file(path, columns=list(REQUIRED))
    if frame.empty:
        raise UserError(f"{path}: no interactions (the file holds only its header)")
    for name in REQUIRED:
        empty = np.flatnonzero(frame[name].str.strip().to_numpy() == "")
        if len(empty):
            raise UserError(f"{path}: line {empty[0] + 2} has no {name} ({len(empty)} such lines)")
    stamps = pd.to_numeric(frame["timestamp"], errors="coerce")
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise UserError(f"{path}: line {row + 2}: timestamp {frame['timestamp'].iloc[row]!r} is not a number")
    counts = frame["user_id"].value_counts()
    few = counts[counts < MIN_INTERACTIONS]
    if len(few):
        shown = ", ".join(f"{u} ({n})" for u, n in few.head(5).items())
        raise UserError(f"{path}: {len(few)} users have fewer than {MIN_INTERACTIONS} interactions, which "
                        f"leave-one-out cannot split into training, validation and test: {shown}. "
                        f"Remove them from the file.")
