"""Shared fixtures: tiny configs over the ML-100K copy inside the RecBole package, and synthetic
512-d image / 384-d text features for every ML-100K item, so the image path is exercised."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# cuBLAS reads it once, when a process first uses it: set before any test touches a GPU, so the
# `deterministic: true` checks (tests marked cuda) hold whichever test ran first. No effect on a CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from recbole_ext import compat  # noqa: E402,F401
from recbole_ext.config import load_config  # noqa: E402


# The modules whose tests take a minute or more together (docs/benchmarks-test-suite.json): under
# pytest-xdist, where a module runs in one worker, they start first, so the workers end together.
LONGEST = ("test_tune.py", "test_backends.py", "test_resume.py")


def pytest_collection_modifyitems(items):
    """The Flower deployments first (pytest.ini's `deployment` marker), then the LONGEST modules, then
    the rest in their order."""
    def order(item):
        name = item.path.name
        return item.get_closest_marker("deployment") is None, LONGEST.index(name) if name in LONGEST else len(LONGEST)

    items.sort(key=order)


@pytest.hookimpl(optionalhook=True)  # a plain `pytest -p no:xdist` has no such hook
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (make test) a module's tests run in one worker, so its module-scoped fixtures
    (built stages, trained runs, a sweep, a Ray cluster) are made once, not once per worker; only
    test_flower.py's tests go out one by one, so its deployments run side by side. (pytest-xdist's own
    `--dist loadgroup` does not group on pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def __init__(self, config, log):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # the collection's order (above), not by test count

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module.endswith("test_flower.py") else module

    return ModuleScheduling(config, log)


def recbole_example_dir() -> str:
    import recbole
    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example")


def write_features(path: Path, width: int, seed: int, n_items: int = 1682) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, ids=np.array([str(i) for i in range(1, n_items + 1)]),
             emb=rng.standard_normal((n_items, width)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    return {"text": str(write_features(folder / "text.npz", 384, 1)),
            "image": str(write_features(folder / "image.npz", 512, 2))}


def tiny_config(stage_file: str, run_dir: Path, features: dict | None = None, sets: list[str] = ()) -> dict:
    """A stage file shrunk to 30 users and a small model, on the RecBole package's ML-100K."""
    base = [f"data.path={recbole_example_dir()}", "data.max_users=30", "data.max_seq_length=20",
            "model.hidden_size=32", "model.n_layers=1", "model.inner_size=64", "loss.num_negatives=16",
            "federated.rounds=2", "federated.clients_per_round=8", f"run_dir={run_dir}",
            "model.hidden_dropout_prob=0.0", "model.attn_dropout_prob=0.0"]
    if features:
        base += [f"data.text_features={features['text']}", f"data.image_features={features['image']}"]
    return load_config(ROOT / "yamls" / stage_file, [*base, *sets])


def round_update(backend, clients, global_params: dict, seed: int) -> tuple[dict, dict]:
    """One round of `backend` on `clients` as the server aggregates it: (mean update, mean stats)."""
    from recbole_ext.federated.server import aggregate

    sums = backend.train_clients(clients, global_params, seed)
    return aggregate(sums, global_params, seed, backend.settings["federated"])


def tables_in(text: str) -> list[str]:
    """The Markdown tables of `text`: runs of lines that start with '|'."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def fresh_trainer(stage, initial: dict, folder: Path):
    """A federated trainer of `stage` that starts from the `initial` weights into a new run folder
    (the tests that stop and resume a run build several from one stage)."""
    from recbole_ext.federated.trainer import FederatedTrainer
    from recbole_ext.runs import RunFolder

    stage.model.load_state_dict(initial)
    run = RunFolder(folder)
    run.create(stage.cfg)
    return FederatedTrainer(stage.rb_config, stage.model, stage.cfg, run, {}, stage.windows)
