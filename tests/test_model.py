"""UR4RecMoE: SASRec equivalence at stage 1, gradient paths per stage, frozen parameters stay put."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from recbole_ext import compat
from recbole_ext.errors import UserError
from recbole_ext.local.steps import train_step
from recbole_ext.local.optim import LocalOptimizer
from recbole_ext.federated.trainer import FederatedTrainer
from recbole_ext.pipeline import Stage
from recbole_ext.runs import RunFolder

STAGE2_GROUPS = {"visual_proj", "text_proj", "align_gating"}


def build(stage_file, tmp_path, features=None, sets=()):
    return Stage(tiny_config(stage_file, tmp_path / "run", features, ["load=[]", *sets]), stage_file)


def test_stage1_scores_equal_recbole_sasrec(tmp_path):
    from recbole.model.sequential_recommender.sasrec import SASRec

    stage = build("stage1.yaml", tmp_path)
    torch.manual_seed(7)
    sasrec = SASRec(stage.rb_config, stage.dataset)
    result = stage.model.load_state_dict(sasrec.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} <= {
        "visual_proj", "text_proj", "align_gating", "visual_expert", "semantic_expert", "router", "fusion", "gamma"}
    sasrec.eval(), stage.model.eval()
    interaction = next(iter(stage.evaluator.loaders["test"]))[0]
    with torch.no_grad():
        assert torch.equal(stage.model.full_sort_predict(interaction), sasrec.full_sort_predict(interaction))
        torch.testing.assert_close(stage.model.predict(interaction), sasrec.predict(interaction))


def client_batch(stage, clients=3):
    users = stage.windows.clients[:clients]
    index = stage.windows.windows_of(users)
    owners = np.repeat(users, [stage.windows.window_offsets[u + 1] - stage.windows.window_offsets[u] for u in users])
    return index, owners.tolist()


def gradients(stage, generator_seed=0):
    index, owners = client_batch(stage)
    model = stage.model
    model.train()
    model.zero_grad(set_to_none=True)
    w = stage.windows
    valid = w.targets[index] > 0
    from recbole_ext.local.steps import backward_in_parts
    from recbole_ext.local.negatives import sample_negatives
    distinct, owner = torch.unique(torch.as_tensor(owners), return_inverse=True)
    negatives = sample_negatives(w.excluded(distinct.tolist()), owner.unsqueeze(1).expand_as(valid)[valid], 16,
                                 torch.Generator().manual_seed(generator_seed))
    backward_in_parts(model, w.inputs[index], w.targets[index], w.mem_rows[index], negatives, 10 ** 6)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage_file", ["stage1.yaml", "stage2.yaml", "stage3.yaml"])
def test_every_trainable_parameter_gets_a_gradient(stage_file, tmp_path, features):
    # gamma is initialised away from 0 here so the experts see a gradient in the first step too;
    # the default gating_init = 0 case is covered by the next test.
    stage = build(stage_file, tmp_path, features, ["model.gating_init=0.5"])
    grads = gradients(stage)
    assert grads
    dead = [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    assert not dead, f"{stage_file}: trainable parameters without gradient: {dead}"


def test_stage3_gamma_gets_gradient_first_and_experts_right_after(tmp_path, features):
    stage = build("stage3.yaml", tmp_path, features)
    assert float(stage.model.gamma) == 0.0
    grads = gradients(stage)
    assert grads["gamma"].abs() > 0
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith("fusion."))
    optimizer = LocalOptimizer(stage.model, {"optimizer": "adamw", "learning_rate": 1e-2, "weight_decay": 0.0,
                                             "clip_grad_norm": None})
    optimizer.step()
    assert float(stage.model.gamma) != 0.0
    grads = gradients(stage, generator_seed=1)
    dead = [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    assert not dead


def test_stage2_trains_only_projectors_and_gating(tmp_path, features):
    stage = Stage(tiny_config("stage2.yaml", tmp_path / "run", features,
                              ["load=[]", "model.hidden_size=128", "model.n_heads=2"]), "stage2.yaml")
    assert set(stage.trainable) == STAGE2_GROUPS
    expected = sum(p.numel() for n, p in stage.model.named_parameters() if n.split(".")[0] in STAGE2_GROUPS)
    assert sum(stage.trainable.values()) == expected < 200_000


@pytest.mark.parametrize("stage_file", ["stage1.yaml", "stage2.yaml", "stage3.yaml"])
def test_a_round_changes_trainable_and_nothing_frozen(stage_file, tmp_path, features):
    # Local AdamW: its first step moves every parameter with a non-zero gradient by about the
    # learning rate. A single SGD step scales tiny gradients (the fusion norms') below float32
    # resolution of the parameter, so "moved" would test the rounding, not the round.
    stage = build(stage_file, tmp_path, features,
                  ["model.gating_init=0.5", "optim.optimizer=adamw", "optim.learning_rate=0.001"])
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    run = RunFolder(tmp_path / "run")
    run.create(stage.cfg)
    trainer = FederatedTrainer(stage.rb_config, stage.model, stage.cfg, run, {}, stage.windows)
    stats, bytes_up = trainer.train_unit(1, stage.windows, False)
    assert np.isfinite(float(stats["loss"]))
    trainable_size = sum(p.numel() * 4 for p in trainer.trainable.values())
    assert bytes_up == 8 * trainable_size
    for name, param in stage.model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not move"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_server_lr_groups_give_their_parameters_their_own_server_rate(tmp_path, features):
    """With FedAdam each parameter's step depends on its own rate alone, so one round with
    {gamma, router.*} at 0.05 leaves those parameters where a run with server_lr 0.05 leaves them, and
    every other one where the default rate leaves it."""
    def one_round(sets, name):
        stage = build("stage3.yaml", tmp_path / name, features,
                      ["model.gating_init=0.5", "federated.server_optimizer=adam", *sets])
        run = RunFolder(tmp_path / name / "run")
        run.create(stage.cfg)
        trainer = FederatedTrainer(stage.rb_config, stage.model, stage.cfg, run, {}, stage.windows)
        trainer.train_unit(1, stage.windows, False)
        return {n: p.detach().clone() for n, p in trainer.trainable.items()}

    grouped = one_round(["federated.server_lr=0.001", "federated.server_lr_groups={gamma: 0.05, router.*: 0.05}"],
                        "grouped")
    slow = one_round(["federated.server_lr=0.001"], "slow")
    fast = one_round(["federated.server_lr=0.05"], "fast")
    for name, value in grouped.items():
        reference = fast if name == "gamma" or name.startswith("router.") else slow
        torch.testing.assert_close(value, reference[name], msg=name)
    backbone = next(n for n in grouped if n.startswith("trm_encoder."))
    assert not torch.allclose(slow[backbone], fast[backbone])  # the two rates do lead to different places


def test_server_lr_group_that_matches_nothing_trainable_names_the_key(tmp_path, features):
    with pytest.raises(UserError, match=r"server_lr_groups pattern 'item_embedding\.\*' matches no trainable"):
        build("stage3.yaml", tmp_path, features, ["federated.server_lr_groups={item_embedding.*: 0.01}"])


# Text features only, as in the ML-100K demo and every text-only run: the softmaxes over the available
# modalities are constant, and whatever feeds only the image side is multiplied by a zero weight.
TEXT_ONLY_DEAD = {"stage2.yaml": {"visual_proj", "align_gating"},
                  "stage3.yaml": {"visual_proj", "align_gating", "visual_expert", "router"}}


@pytest.mark.parametrize("stage_file", ["stage2.yaml", "stage3.yaml"])
def test_with_one_modality_every_reported_trainable_parameter_gets_a_gradient(stage_file, tmp_path, features):
    stage = build(stage_file, tmp_path, None, [f"data.text_features={features['text']}", "model.gating_init=0.5"])
    assert not TEXT_ONLY_DEAD[stage_file] & set(stage.trainable)
    assert {n.split(".")[0] for n in stage.gradientless} == TEXT_ONLY_DEAD[stage_file] | (
        {"fusion"} if stage_file == "stage3.yaml" else set())
    assert "not trained, although declared trainable" in stage.describe()
    grads = gradients(stage)
    assert sum(g.numel() for g in grads.values()) == sum(stage.trainable.values())
    dead = [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    assert not dead, f"{stage_file}: reported trainable but without gradient: {dead}"
    run = RunFolder(tmp_path / "round")
    run.create(stage.cfg)
    trainer = FederatedTrainer(stage.rb_config, stage.model, stage.cfg, run, {}, stage.windows)
    _, bytes_up = trainer.train_unit(1, stage.windows, False)
    assert bytes_up == 4 * sum(stage.trainable.values()) * stage.cfg["federated"]["clients_per_round"]


def test_with_both_modalities_nothing_declared_trainable_is_left_out(tmp_path, features):
    stage = build("stage3.yaml", tmp_path, features)  # gamma starts at 0: the experts still count
    assert stage.gradientless == []
    assert set(stage.trainable) == {n.split(".")[0] for n, _ in stage.model.named_parameters()} - {"item_embedding"}


def test_a_frozen_backbone_runs_without_dropout_and_a_training_one_with_it(tmp_path, features):
    sets = ["model.hidden_dropout_prob=0.5", "model.attn_dropout_prob=0.5"]
    for stage_file, deterministic in (("stage2.yaml", True), ("stage1.yaml", False)):
        stage = build(stage_file, tmp_path / stage_file, features, sets)
        inputs = stage.windows.inputs[:4]
        stage.model.train()
        with torch.no_grad():
            trained = stage.model.encode(inputs)
            stage.model.eval()
            reference = stage.model.encode(inputs)
        assert torch.equal(trained, reference) == deterministic, stage_file


@pytest.mark.parametrize("stage_file", ["stage1.yaml", "stage3.yaml"])
def test_a_client_larger_than_the_pass_limit_gets_the_one_pass_gradient(stage_file, tmp_path, features):
    from recbole_ext.local.steps import backward_in_parts
    from recbole_ext.local.negatives import sample_negatives

    stage = build(stage_file, tmp_path, features, ["model.gating_init=0.5"])
    model, w = stage.model, stage.windows
    user = int(w.clients[np.argmax(w.num_targets[w.clients])])
    index = w.windows_of([user])
    assert w.num_targets[user] > 40 and len(index) > 2
    valid = w.targets[index] > 0
    negatives = sample_negatives(w.excluded([user]), torch.zeros(int(valid.sum()), dtype=torch.long), 16,
                                 torch.Generator().manual_seed(0))
    model.eval()
    results = []
    for limit in (10 ** 6, 30):  # one pass; parts of at most 30 positions (one window of 20 each)
        model.zero_grad(set_to_none=True)
        stats = backward_in_parts(model, w.inputs[index], w.targets[index], w.mem_rows[index], negatives, limit)
        results.append((stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (whole_stats, whole), (part_stats, parts) = results
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    for key in ("loss", "rec_loss", "align_loss", "lb_loss"):
        torch.testing.assert_close(part_stats[key], whole_stats[key], atol=1e-6, rtol=1e-5, msg=key)


def test_without_images_the_skipped_visual_expert_changes_no_score(tmp_path, features):
    stage = build("stage3.yaml", tmp_path, None, [f"data.text_features={features['text']}", "model.gating_init=0.5"])
    model = stage.model.eval()
    assert not model.has_images
    interaction = next(iter(stage.evaluator.loaders["valid"]))[0]
    with torch.no_grad():
        skipped = model.full_sort_predict(interaction)
        model.has_images = True
        computed = model.full_sort_predict(interaction)
    assert torch.equal(skipped, computed)
