"""The RecBole workarounds: numpy aliases, argv isolation, RecBole's own checkpoints."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from recbole_ext import compat
from conftest import recbole_example_dir


def test_numpy_aliases_restored():
    assert np.float_ is np.float64 and np.complex_ is np.complex128 and np.unicode_ is np.str_


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    """What a fresh interpreter shows: torch's anomaly detection after it imports the model and then
    another RecBole model, and whether importing run.py and the pipeline imported recbole.quick_start."""
    import json
    import subprocess
    code = ("import json, sys, torch; sys.path.insert(0, '.'); import recbole_ext.model.ur4rec_moe; "
            "import recbole.model.sequential_recommender.sine; anomaly = torch.is_anomaly_enabled(); "
            "import run; from recbole_ext import pipeline, training, evaluation; "
            "print(json.dumps({'anomaly': anomaly, 'quick_start': 'recbole.quick_start' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_model_leaves_anomaly_detection_off(fresh_process):
    assert fresh_process["anomaly"] is False


def test_recbole_config_ignores_command_line_flags(monkeypatch):
    from recbole.model.sequential_recommender.sasrec import SASRec

    monkeypatch.setattr(sys, "argv", ["run.py", "--learning_rate=0.5", "--config=yamls/x.yaml"])
    config = compat.recbole_config(SASRec, "ml-100k", {"data_path": "/somewhere", "learning_rate": 0.01,
                                                       "train_neg_sample_args": None})
    assert config["learning_rate"] == 0.01 and config["config"] is None
    assert config["data_path"] == "/somewhere/ml-100k"  # not the package's bundled copy
    assert sys.argv[1] == "--learning_rate=0.5"


def test_recbole_config_keeps_the_device_asked_for_and_the_visible_gpus(monkeypatch):
    """RecBole's Config picks CUDA whenever a GPU is visible and rewrites CUDA_VISIBLE_DEVICES."""
    from recbole.model.sequential_recommender.sasrec import SASRec

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    config = compat.recbole_config(SASRec, "ml-100k", {"data_path": "/somewhere", "device": "cpu",
                                                       "train_neg_sample_args": None})
    assert config["device"] == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


def test_recbole_quick_start_is_never_imported(fresh_process):
    assert fresh_process["quick_start"] is False


def test_loads_a_checkpoint_recbole_itself_saved(tmp_path):
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender.sasrec import SASRec
    from recbole.trainer import Trainer

    config = compat.recbole_config(SASRec, "ml-100k", {
        "data_path": recbole_example_dir(), "checkpoint_dir": str(tmp_path), "epochs": 1,
        "train_neg_sample_args": None, "hidden_size": 8, "inner_size": 16, "n_layers": 1,
        "MAX_ITEM_LIST_LENGTH": 5, "train_batch_size": 4096, "show_progress": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    model = SASRec(config, train.dataset)
    with compat.writes_into(tmp_path):
        trainer = Trainer(config, model)
        trainer._save_checkpoint(0)
    with pytest.raises(Exception):  # torch's default weights_only=True refuses RecBole's pickled Config
        torch.load(trainer.saved_model_file)
    checkpoint = compat.load_recbole_checkpoint(trainer.saved_model_file)
    assert torch.equal(checkpoint["state_dict"]["item_embedding.weight"], model.item_embedding.weight)
    assert (tmp_path / "log_tensorboard").is_dir()
