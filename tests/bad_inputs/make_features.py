"""Rebuild the feature files of the feature cases: 384-d rows for the tiny dataset's items 1..40,
each broken in its own way, and a valid one for a stage-3 case whose defect lies elsewhere."""
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
rng = np.random.default_rng(0)
ids = np.array([str(i) for i in range(1, 41)])
emb = rng.standard_normal((40, 384)).astype(np.float32)
cases = {
    "features_nan": (ids, np.where(np.arange(40)[:, None] == 4, np.nan, emb)),
    "features_inf": (ids, np.where(np.arange(40)[:, None] == 2, np.inf, emb)),
    "features_wrong_width": (ids, emb[:, :300]),
    "features_duplicate_ids": (np.concatenate([ids, ["7"]]), np.concatenate([emb, emb[:1]])),
    "features_unknown_ids": (np.concatenate([ids, ["999"]]), np.concatenate([emb, emb[:1]])),
    "stage3_without_stage2_checkpoint": (ids, emb),  # stage 3 needs features to get to its checkpoints
}
for case, (case_ids, case_emb) in cases.items():
    np.savez(HERE / case / "features.npz", ids=case_ids, emb=case_emb.astype(np.float32))
