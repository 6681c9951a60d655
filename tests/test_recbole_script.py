"""UR4RecMoE from a stock RecBole script: RecBole's Config, create_dataset, data_preparation and Trainer,
with the defaults, dataset and side info the package supplies, and the errors that replace silent
scoring without memory or features."""
from __future__ import annotations

import re
import sys

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.data.dataset import SequentialDataset
from recbole.utils import init_seed

from conftest import ROOT, write_features
from recbole_ext.config import load_config
from recbole_ext.data.dataset import MEM_ROW, UR4RecDataset
from recbole_ext.errors import UserError
from recbole_ext.evaluation import TwoProtocolEvaluator
from recbole_ext.model import ur4rec_moe
from recbole_ext.model.ur4rec_moe import DEFAULTS, UR4RecMoE
from recbole_ext.pipeline import Stage, recbole_settings

TINY = ROOT / "tests" / "bad_inputs" / "_data"  # 6 users, 40 items, with timestamps
TINY_SETTINGS = {"data_path": str(TINY), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                 "hidden_size": 16, "inner_size": 32, "n_layers": 1, "MAX_ITEM_LIST_LENGTH": 10,
                 "show_progress": False}
STAGE3 = {"align": True, "experts": True}


@pytest.fixture(autouse=True)
def plain_recbole(monkeypatch, tmp_path):
    """What a user's script sees: no command-line flags (RecBole's Config reads them), and a working
    directory for the log/ and saved/ RecBole writes."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def text_file(tmp_path):
    return str(write_features(tmp_path / "text.npz", 384, 1, n_items=40))


def tiny(settings: dict, dataset_class=None):
    config = Config(model=UR4RecMoE, dataset="tiny", config_dict={**TINY_SETTINGS, **settings})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config) if dataset_class is None else dataset_class(config)
    return (config, *data_preparation(config, dataset))


def test_the_package_defaults_are_base_yaml():
    cfg = load_config(ROOT / "yamls" / "base.yaml")
    settings = recbole_settings(cfg)
    assert set(cfg["model"]) <= set(DEFAULTS)
    assert {key: settings[key] for key in DEFAULTS} == DEFAULTS


def test_a_plain_config_gets_the_defaults_below_its_own_settings():
    config = Config(model=UR4RecMoE, dataset="tiny", config_dict={"data_path": str(TINY), "hidden_size": 16,
                                                                  "memory": {"st_k": 2}})
    assert config["hidden_size"] == 16 and config["memory"] == {"st_k": 2}
    assert config["train_neg_sample_args"]["distribution"] == "none"  # RecBole's spelling of None
    rest = set(DEFAULTS) - {"hidden_size", "memory", "train_neg_sample_args"}
    assert {key: config[key] for key in rest} == {key: DEFAULTS[key] for key in rest}


def test_create_dataset_gives_the_model_the_features_and_memory_a_stage_gets(tmp_path, text_file):
    config, train, _, test = tiny({**STAGE3, "text_features": text_file})
    assert isinstance(train.dataset, UR4RecDataset) and MEM_ROW in next(iter(test))[0].interaction
    model = UR4RecMoE(config, train.dataset)
    stage = Stage(load_config(ROOT / "yamls" / "stage3.yaml", [
        f"data.path={TINY}", "data.dataset=tiny", "data.max_users=null", f"data.text_features={text_file}",
        "load=[]", f"run_dir={tmp_path / 'run'}"]), "stage3")
    assert model.memory.shape == (48, 8) and bool((model.memory > 0).any())
    for buffer in ("memory", "text_feat", "image_feat", "available"):
        assert torch.equal(getattr(model, buffer), getattr(stage.model, buffer)), buffer


def test_align_or_experts_on_a_plain_sequential_dataset_is_refused(text_file):
    config, train, _, _ = tiny({**STAGE3, "text_features": text_file}, SequentialDataset)
    with pytest.raises(UserError, match="UR4RecDataset"):
        UR4RecMoE(config, train.dataset)


def test_experts_refuse_interactions_without_memory_rows(text_file):
    config, train, _, _ = tiny({**STAGE3, "text_features": text_file})
    model = UR4RecMoE(config, train.dataset)
    _, plain_train, _, plain_test = tiny({**STAGE3, "text_features": text_file}, SequentialDataset)
    for score in (lambda: model.full_sort_predict(next(iter(plain_test))[0]),
                  lambda: model.calculate_loss(next(iter(plain_train)))):
        with pytest.raises(UserError, match=re.escape(f"'{MEM_ROW}' field") + ".*UR4RecDataset"):
            score()


@pytest.mark.parametrize("switches", [{"align": True}, STAGE3], ids=["align", "align+experts"])
def test_align_or_experts_without_any_feature_are_refused(switches):
    config, train, _, _ = tiny(switches)
    with pytest.raises(UserError, match="text_features.*image_features"):
        UR4RecMoE(config, train.dataset)


@pytest.mark.parametrize("switches", [{}, {"align": True}, STAGE3], ids=["stage1", "stage2", "stage3"])
def test_chunked_loss_and_gradients_equal_the_whole_batch(switches, text_file, monkeypatch):
    config, train, _, _ = tiny({**switches, "text_features": text_file, "gating_init": 0.5,
                                "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "align_dropout_prob": 0.0})
    model = UR4RecMoE(config, train.dataset).double()
    batch = next(iter(train))

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        loss = model.calculate_loss(batch)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    whole = loss_and_gradients()
    rows = 4
    monkeypatch.setattr(ur4rec_moe, "SCORE_CHUNK_ELEMENTS", rows * model.n_items * model.hidden_size)
    assert len(batch) > 2 * rows  # several chunks, the last one short
    chunked = loss_and_gradients()
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
    assert chunked[1].keys() == whole[1].keys()
    for name, grad in whole[1].items():
        torch.testing.assert_close(chunked[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    if switches == STAGE3:
        # text only: the visual expert is skipped (the router gives it weight 0), so it has no gradient at all
        assert {n.split(".")[0] for n in whole[1]} >= {"semantic_expert", "router", "fusion", "gamma"}


def readme_script() -> str:
    """The Python block of docs/RECBOLE.md's section on RecBole scripts, exactly as printed there."""
    page = (ROOT / "docs" / "RECBOLE.md").read_text()
    section = page.split("## Use it from your own RecBole script", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_script_trains_and_tests_with_recboles_metrics(tmp_path):
    (tmp_path / "data" / "ml-100k").mkdir(parents=True)
    write_features(tmp_path / "data" / "ml-100k" / "text_minilm.npz", 384, 1)  # stands in for MiniLM's
    namespace = {"__name__": "__main__"}
    exec(compile(readme_script(), "docs/RECBOLE.md", "exec"), namespace)
    for name in ("stage1", "stage3"):
        trainer, test_data, metrics = namespace[name]
        ours = TwoProtocolEvaluator(trainer.config, test_data.dataset, {"test": test_data}, seed=0)
        ours = ours.evaluate(trainer.model, "test")["full"]
        assert set(metrics) == set(ours) >= {"hit@10", "ndcg@10", "mrr@10"}, name
        for key, value in metrics.items():
            assert float(value) == pytest.approx(ours[key], abs=1e-12), (name, key)
    stage3 = namespace["stage3"][0].model
    assert stage3.use_experts and stage3.memory.shape[1] == 8 and bool(stage3.available[:, 1].any())
