"""`run.py attack RUN_DIR`: what a curious server learns about one client's history from its upload.

For a sample of clients, the server is handed each client's upload exactly as the run's configuration
sends it (privacy.Uploads: plain, clipped under DP, masked under secure aggregation, sparse rows), from
the run's best checkpoint as the global model, in a round the run never trained. Under
`federated.flower.secaggplus` it is the user's node's masked vector, from a round of Flower's SecAgg+
workflow and client mod run in this process (flower/secaggplus.py). It ranks the
catalogue by how likely each item is in the client's training history, with two scores read off the
item-embedding rows of the upload:

* `row_norm`: the L2 norm of the item's row. A client's update moves the rows of its inputs and
  targets (its history) at every position, and those of its sampled negatives once or twice.
* `row_sent`: 1 if the row is in the upload at all (non-zero, or among a sparse upload's ids), else 0:
  the touched-row set, history and negatives together.

A stage whose item embedding does not train (stage 2) uploads no item rows, but its projectors: the
server also knows the public feature tables, and a projector's update is a sum over the items the
client scored of (gradient) x (feature vector)^T. So a third score reads it:

* `text_response` / `image_response`: ||dW u_i|| / ||u_i||, with dW the projector's weight update and
  u_i the item's feature vector minus the catalogue's mean (the mean is shared by every item, and
  MiniLM vectors have a large one). Items without that modality score 0.

It reports ROC-AUC (0.5: the upload says nothing) and precision@|history| (ties broken at random),
averaged over clients. DP noise is added to the sum of a round, never to one upload, so under DP the
server's view of a client is its clipped update. The DP noise of the sum and secure aggregation's protection
against a server that sees only sums are about aggregates, which this single-upload probe does not
measure.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

SCORES = ("row_norm", "row_sent")
# projector weight -> (its score's name, the model's feature table, the modality's `available` column)
PROJECTORS = {"text_proj.weight": ("text_response", "text_feat", 1),
              "visual_proj.weight": ("image_response", "image_feat", 0)}


def server_view(backend, user: int, global_params: dict, round_seed: int, round_clients) -> tuple[dict, int]:
    """name -> what the server holds of `user`'s upload, as floats (masked residues decoded as the
    server would decode a sum); and the bytes the upload takes."""
    from ..federated.privacy import decode

    sums = backend.train_clients([user], global_params, round_seed, round_clients=round_clients)
    flower = backend.settings["federated"]["flower"]
    if flower["secaggplus"]:  # the user's node sends its sums over the round's client count, masked
        from ..federated.flower.secaggplus import masked_upload

        return masked_upload({n: v / len(round_clients) for n, v in sums.update.items()}, flower)
    if sums.modulus is None:
        return sums.update, sums.bytes_up
    return {name: decode(value, torch.float64) for name, value in sums.update.items()}, sums.bytes_up


def item_scores(rows: torch.Tensor) -> dict:
    """Per item (row 1.. of the item-embedding upload): each score of SCORES."""
    rows = rows[1:].double().cpu()  # a GPU run's upload is on its device
    return {"row_norm": rows.norm(dim=1).numpy(), "row_sent": rows.ne(0).any(1).double().numpy()}


def projector_response(update: torch.Tensor, features: torch.Tensor, available: torch.Tensor) -> np.ndarray:
    """Per item (row 1.. of the feature table): ||dW u_i|| / ||u_i||, u_i the item's centred feature
    vector; 0 for an item without the modality."""
    feats, have, update = features[1:].double().cpu(), available[1:].cpu(), update.cpu()
    centred = feats - feats[have].mean(0)
    response = (centred @ update.double().T).norm(dim=1) / centred.norm(dim=1).clamp_min(1e-12)
    return torch.where(have, response, torch.zeros_like(response)).numpy()


def upload_scores(view: dict, model) -> dict:
    """Every score the upload supports: from the item rows when they train, else from each projector
    that trains and has items with its modality."""
    from ..federated.privacy import ITEM_ROWS

    if ITEM_ROWS in view:
        return item_scores(view[ITEM_ROWS])
    return {PROJECTORS[w][0]: projector_response(view[w], getattr(model, PROJECTORS[w][1]),
                                                 model.available[:, PROJECTORS[w][2]])
            for w in projector_sources(view, model)}


def projector_sources(uploaded, model) -> list[str]:
    """The projector weights among `uploaded` (names) whose modality some item has."""
    return [w for w, (_, _, column) in PROJECTORS.items() if w in uploaded and bool(model.available[1:, column].any())]


def auc_and_precision(score: np.ndarray, in_history: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    k = int(in_history.sum())
    order = np.lexsort((rng.random(len(score)), -score))  # by score, ties in random order
    return float(roc_auc_score(in_history, score)), float(in_history[order[:k]].mean())


def attack(run_dir: str, clients: int = 32, seed: int = 0, sets: list[str] = ()) -> dict:
    """`sets`: config overrides of the upload (e.g. federated.secure_aggregation=true), to see what the
    same trained model's clients would send under another setting."""
    from ..federated.backends import SequentialBackend
    from ..local.steps import round_seed
    from ..federated.privacy import ITEM_ROWS
    from ..pipeline import trained_stage

    folder = Path(run_dir)
    stage = trained_stage(run_dir, sets)
    cfg = stage.cfg
    if cfg["trainer"] != "federated":
        raise UserError(f"{folder}: a {cfg['trainer']} run uploads nothing; the attack needs a federated run")
    fed = cfg["federated"]
    setting = {"secure_aggregation": fed["secure_aggregation"], "secaggplus": fed["flower"]["secaggplus"],
               "sparse_uploads": fed["sparse_uploads"],
               "dp": fed["dp"] if fed["dp"]["clip_norm"] is not None else None}
    out = {"run": str(folder), "stage": cfg["stage"], "seed": seed, "upload": setting, "clients": 0, "scores": {}}
    global_params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    if ITEM_ROWS not in global_params and not projector_sources(global_params, stage.model):
        out["note"] = f"neither {ITEM_ROWS} nor a projector with features trains in this stage: nothing to score"
        return out
    rng = np.random.default_rng(seed)
    pool = stage.windows.clients
    sample = np.sort(rng.choice(pool, size=min(clients, len(pool)), replace=False))
    # Every backend uploads the same update (tests/test_backends.py); the reference one is enough here.
    backend = SequentialBackend(stage.model, stage.windows, cfg)
    seed_of_round = round_seed(cfg["seed"], fed["rounds"] + 1)
    values, sizes, norms = {}, [], []
    for user in sample:
        view, size = server_view(backend, int(user), global_params, seed_of_round, sample)
        sizes.append(size)
        if not (fed["secure_aggregation"] or fed["flower"]["secaggplus"]):  # a masked upload's norm is the mask's
            norms.append(float(sum(v.double().pow(2).sum() for v in view.values()).sqrt()))
        in_history = np.zeros(stage.windows.n_items - 1, dtype=bool)
        in_history[stage.windows.history[user] - 1] = True
        if in_history.all():
            continue
        for name, score in upload_scores(view, stage.model).items():
            values.setdefault(name, []).append(auc_and_precision(score, in_history, rng))
    out["clients"] = len(next(iter(values.values()), []))
    out["mb_up_per_client"] = float(np.mean(sizes)) / 1e6
    if norms:
        # the L2 norms of the uploads (after clipping under DP): what a DP clip_norm is chosen against
        out["upload_norm"] = {q: float(np.quantile(norms, level)) for q, level in
                              (("min", 0.0), ("median", 0.5), ("p90", 0.9), ("max", 1.0))}
    for name, pairs in values.items():
        auc, precision = np.array(pairs).T
        out["scores"][name] = {"auc": float(auc.mean()), "auc_std": float(auc.std()),
                               "precision_at_history": float(precision.mean())}
    return out


def upload_label(setting: dict) -> str:
    """A record's upload setting in words, e.g. "secure aggregation" or "DP clip 1.0, noise 1.5"."""
    parts = [name for key, name in (("secaggplus", "SecAgg+"), ("secure_aggregation", "secure aggregation"),
                                    ("sparse_uploads", "sparse uploads")) if setting[key]]
    if setting["dp"]:
        parts.append(f"DP clip {setting['dp']['clip_norm']}, noise {setting['dp']['noise_multiplier']}")
    return " + ".join(parts) or "plain"


def table(records: list[dict]) -> str:
    """One row per attack record (one upload setting): each score's AUC and precision, and the
    upload's size. Rows in a fixed order whatever the records' order: plain, masked, sparse, DP by noise."""
    records = sorted(records, key=lambda r: (r["upload"]["dp"] is not None,
                                             (r["upload"]["dp"] or {}).get("noise_multiplier", 0),
                                             r["upload"]["sparse_uploads"],
                                             r["upload"]["secure_aggregation"] or r["upload"]["secaggplus"]))
    names = list(dict.fromkeys(name for r in records for name in r["scores"]))
    head = ["upload"] + [f"{name} {part}" for name in names
                         for part in ("AUC (mean ± std)", "precision@\\|history\\|")] + ["MB per upload"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [upload_label(r["upload"])]
        for name in names:
            s = r["scores"].get(name)
            cells += [f"{s['auc']:.3f} ± {s['auc_std']:.3f}", f"{s['precision_at_history']:.3f}"] if s else ["–", "–"]
        cells.append(f"{r['mb_up_per_client']:.3f}" if "mb_up_per_client" in r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py attack", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?")
    parser.add_argument("--clients", type=int, default=32,
                        help="clients to attack, also the round's clients (mask partners); default 32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the client sample and tie-breaking")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="upload setting to attack instead of the run's own, e.g. "
                             "--set federated.sparse_uploads=true (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers here")
    parser.add_argument("--records", nargs="+", metavar="FILE",
                        help="instead of attacking a run, print one table of these --json records")
    args = parser.parse_args(argv)
    if args.records:
        if args.run_dir:
            raise UserError("give a RUN_DIR to attack or --records to print, not both")
        print(table([read_record(path) for path in args.records]))
        return
    if not args.run_dir:
        raise UserError("run.py attack needs a RUN_DIR (or --records FILE ...)")
    if args.clients < 2:  # they are also the round: one client alone has no mask partner
        raise UserError(f"--clients must be >= 2, got {args.clients}")
    result = attack(args.run_dir, args.clients, args.seed, args.set)
    print(f"{args.run_dir}: stage {result['stage']}, upload {json.dumps(result['upload'])}, "
          f"{result['clients']} clients" + (f", {result['mb_up_per_client']:.3f} MB per upload"
                                            if "mb_up_per_client" in result else ""))
    if "upload_norm" in result:
        print("upload L2 norm: " + ", ".join(f"{k} {v:.4g}" for k, v in result["upload_norm"].items()))
    print(result["note"] if "note" in result else table([result]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def read_record(path: str) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable attack record ({error})") from error
    if not {"upload", "scores"} <= set(record):
        raise UserError(f"{path}: not an attack record (no 'upload' and 'scores'; written by run.py attack --json)")
    return record
