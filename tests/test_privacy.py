"""Privacy options: DP clipping and noise, the accountant, secure aggregation's masks, sparse uploads,
and the attack probe that measures what one upload tells the server."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import run
from conftest import ROOT, round_update, tables_in, tiny_config
from recbole_ext.analysis.attack import auc_and_precision, item_scores, server_view, upload_scores
from recbole_ext.federated.backends import BACKENDS
from recbole_ext.federated.privacy import (ITEM_ROWS, MODULUS, Accountant, Uploads, clip_, decode,
                                           mask_partners)
from recbole_ext.pipeline import Stage

SETS = ["load=[]", "federated.clients_per_round=6", "federated.cohort_size=3"]
CORPUS = ROOT / "tests" / "bad_inputs"


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    built = Stage(tiny_config("stage1.yaml", tmp_path_factory.mktemp("privacy") / "run", None, SETS), "stage1.yaml")
    return built, {k: v.clone() for k, v in built.model.state_dict().items()}


def with_federated(cfg: dict, **values) -> dict:
    return {**cfg, "federated": {**cfg["federated"], **values}}


def dp(clip_norm, noise_multiplier=0.0, delta=None) -> dict:
    return {"clip_norm": clip_norm, "noise_multiplier": noise_multiplier, "delta": delta}


def backend_for(stage, name: str, settings: dict):
    built, initial = stage
    built.model.load_state_dict(initial)
    global_params = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    return BACKENDS[name](built.model, built.windows, settings), global_params


def norm(update: dict) -> float:
    return float(sum(v.double().pow(2).sum() for v in update.values()).sqrt())


def test_clip_bounds_each_client_and_leaves_small_ones():
    scales = torch.tensor([0.01, 1.0, 10.0, 100.0, 0.5], dtype=torch.float64)
    deltas = {"a": torch.randn(5, 3, 4, dtype=torch.float64), "b": torch.randn(5, 7, dtype=torch.float64)}
    total = torch.stack([v.reshape(5, -1).pow(2).sum(1) for v in deltas.values()]).sum(0).sqrt()
    deltas = {k: v / total.view(-1, *[1] * (v.ndim - 1)) * scales.view(-1, *[1] * (v.ndim - 1))
              for k, v in deltas.items()}  # client c's change has norm scales[c]
    small = {k: v[[0, 4]].clone() for k, v in deltas.items()}
    torch.testing.assert_close(clip_(deltas, 1.0), scales)
    after = torch.stack([v.reshape(5, -1).pow(2).sum(1) for v in deltas.values()]).sum(0).sqrt()
    torch.testing.assert_close(after, scales.clamp(max=1.0))
    for name, value in small.items():  # under the bound: untouched
        torch.testing.assert_close(deltas[name][[0, 4]], value, atol=1e-15, rtol=0)


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_every_clients_contribution_is_clipped_in_every_backend(stage, backend):
    built, _ = stage
    settings = with_federated(built.cfg, dp=dp(0.05))
    made, global_params = backend_for(stage, backend, settings)
    for user in built.windows.clients[:4]:
        sums = made.train_clients([user], global_params, 3)
        assert sums.weight == 1.0  # uniform: the weight says nothing about the client's targets
        assert norm(sums.update) == pytest.approx(0.05, rel=1e-5)  # these clients' changes are all larger


def test_clipped_rounds_agree_across_backends(stage):
    built, _ = stage
    settings = with_federated(built.cfg, dp=dp(0.05))
    clients = built.windows.clients[:6]
    updates = []
    for name in ("sequential", "vectorized"):
        made, global_params = backend_for(stage, name, settings)
        updates.append(round_update(made, clients, global_params, 5)[0])
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], atol=1e-6, rtol=0)


def test_ray_aggregates_masked_clipped_shards(stage):
    # Each actor returns its shard's masked sum (masks pair clients across shards); the driver's
    # modular sum unmasks, and clipping ran per client inside the actors.
    import ray

    built, _ = stage
    built.model.double()
    try:
        settings = with_federated(built.cfg, secure_aggregation=True, dp=dp(0.05), ray_workers=2)
        clients = built.windows.clients[:6]
        updates = []
        for name in ("sequential", "ray"):
            made, global_params = backend_for(stage, name, settings)
            updates.append(round_update(made, clients, global_params, 5)[0])
            if hasattr(made, "close"):
                made.close()
        for name in updates[0]:
            torch.testing.assert_close(updates[1][name], updates[0][name], atol=1e-9, rtol=0)
    finally:
        built.model.float()
        ray.shutdown()


def test_the_noise_on_the_sum_has_the_configured_scale(stage):
    built, _ = stage
    clients = built.windows.clients[:6]
    clip, multiplier = 0.05, 2.0
    clipped, _ = backend_for(stage, "sequential", with_federated(built.cfg, dp=dp(clip)))
    noisy, global_params = backend_for(stage, "sequential", with_federated(built.cfg, dp=dp(clip, multiplier)))
    plain = round_update(clipped, clients, global_params, 5)[0]
    noised = round_update(noisy, clients, global_params, 5)[0]
    noise = torch.cat([(noised[n] - plain[n]).flatten() * len(clients) for n in plain]).double()
    assert noise.numel() > 50_000
    assert float(noise.std()) == pytest.approx(multiplier * clip, rel=0.02)
    assert abs(float(noise.mean())) < 0.01 * multiplier * clip


def test_epsilon_grows_with_rounds_and_matches_the_accountant_called_directly():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    fed = {"dp": dp(1.0, 1.1)}
    accountant = Accountant(fed, users=943, per_round=32)
    assert accountant.delta == pytest.approx(1 / 943)
    eps = [accountant.epsilon(r) for r in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # Replacing one clipped update moves the sum by 2 * clip_norm: the multiplier is halved.
    direct.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(943, 32, dp_accounting.GaussianDpEvent(0.55)), 10))
    assert eps[1] == pytest.approx(direct.get_epsilon(1 / 943), rel=1e-9)
    assert Accountant({"dp": dp(1.0, 0.0)}, 943, 32).epsilon(5) is None


def test_masks_cancel_in_the_sum_and_hide_each_upload():
    torch.manual_seed(0)
    clients = np.array([3, 8, 11, 20, 21, 40, 55, 60, 70, 81])
    deltas = {"w": torch.randn(len(clients), 30, 4, dtype=torch.float64) * 0.01,
              "b": torch.randn(len(clients), 4, dtype=torch.float64)}
    plain = {k: v.sum(0) for k, v in deltas.items()}
    uploads = Uploads({"federated": {"dp": dp(None), "secure_aggregation": True, "sparse_uploads": False}})
    sums = uploads.zeros({k: v[0] for k, v in deltas.items()})
    singles = []
    for c, client in enumerate(clients):
        one = uploads.zeros({k: v[0] for k, v in deltas.items()})
        uploads.add(one, {k: v[c:c + 1].clone() for k, v in deltas.items()}, [client], torch.ones(1), 9, clients)
        singles.append(one.update["w"])
        sums.merge(one)
    for name, value in plain.items():
        torch.testing.assert_close(decode(sums.update[name], torch.float64), value, atol=1e-8, rtol=0)
    # One masked upload is uniform over the ring: its residues spread over [0, MODULUS).
    single = torch.cat([s.flatten() for s in singles]).double() / MODULUS
    assert 0.45 < float(single.mean()) < 0.55 and float(single.min()) < 0.05 and float(single.max()) > 0.95
    partners = {int(c): mask_partners(c, clients) for c in clients}
    assert all(1 <= len(p) < len(clients) - 1 for p in partners.values())  # a ring, not every pair
    for client, pairs in partners.items():  # each pair's mask is added once and subtracted once
        for partner, sign in pairs:
            assert (client, -sign) in partners[partner]


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_secure_aggregate_equals_the_plain_uniform_mean(stage, backend):
    built, _ = stage
    built.model.double()
    try:
        clients = built.windows.clients[:6]
        secure, global_params = backend_for(stage, backend, with_federated(built.cfg, secure_aggregation=True))
        masked, stats = round_update(secure, clients, global_params, 4)
        plain, _ = backend_for(stage, "sequential", built.cfg)
        singles = [plain.train_clients([c], global_params, 4) for c in clients]
        for name in masked:
            expected = sum(s.update[name] / s.weight for s in singles) / len(clients)
            torch.testing.assert_close(masked[name], expected, atol=1e-9, rtol=0)
        numel = sum(v.numel() for v in global_params.values())
        assert stats["bytes_up"] == len(clients) * numel * 8
    finally:
        built.model.float()


def attack_aucs(stage, settings: dict, clients) -> tuple[dict, list]:
    """The attack's mean AUC per item-row score over `clients`' uploads under `settings` (the round's
    clients are `clients` too), and the server's (view, bytes) of each upload."""
    built, _ = stage
    made, global_params = backend_for(stage, "sequential", settings)
    rng, aucs, views = np.random.default_rng(0), {"row_norm": [], "row_sent": []}, []
    for user in clients:
        views.append(server_view(made, int(user), global_params, 7, clients))
        in_history = np.zeros(built.windows.n_items - 1, dtype=bool)
        in_history[built.windows.history[user] - 1] = True
        for score, values in item_scores(views[-1][0][ITEM_ROWS]).items():
            aucs[score].append(auc_and_precision(values, in_history, rng)[0])
    return {score: float(np.mean(values)) for score, values in aucs.items()}, views


def test_a_single_masked_upload_tells_the_attack_nothing_a_sparse_one_much(stage):
    built, _ = stage
    clients = built.windows.clients[:12]
    results = {name: attack_aucs(stage, settings, clients)[0]
               for name, settings in (("sparse", with_federated(built.cfg, sparse_uploads=True)),
                                      ("secure", with_federated(built.cfg, secure_aggregation=True)))}
    assert results["sparse"]["row_norm"] > 0.9
    # The ids a sparse upload sends are the history and the sampled negatives: a leak of their own.
    assert results["sparse"]["row_sent"] > 0.6
    assert abs(results["secure"]["row_norm"] - 0.5) < 0.08
    assert results["secure"]["row_sent"] == 0.5  # every row of a masked upload is non-zero


def test_a_stage2_projector_upload_names_the_history_unless_masked(tmp_path, features):
    """Stage 2 uploads no item rows, but its projectors' updates against the public feature tables."""
    built = Stage(tiny_config("stage2.yaml", tmp_path / "run", features, SETS), "stage2.yaml")
    global_params = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert ITEM_ROWS not in global_params
    clients = built.windows.clients[:12]
    results = {}
    for name, settings in (("plain", built.cfg), ("secure", with_federated(built.cfg, secure_aggregation=True))):
        made = BACKENDS["sequential"](built.model, built.windows, settings)
        rng, aucs = np.random.default_rng(0), {}
        for user in clients:
            view, _ = server_view(made, int(user), global_params, 7, clients)
            in_history = np.zeros(built.windows.n_items - 1, dtype=bool)
            in_history[built.windows.history[user] - 1] = True
            for score, values in upload_scores(view, built.model).items():
                aucs.setdefault(score, []).append(auc_and_precision(values, in_history, rng)[0])
        results[name] = {score: float(np.mean(values)) for score, values in aucs.items()}
    assert set(results["plain"]) == {"text_response", "image_response"}
    assert min(results["plain"].values()) > 0.9
    assert all(abs(auc - 0.5) < 0.08 for auc in results["secure"].values())


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_sparse_uploads_send_less_and_aggregate_the_same(stage, backend):
    built, _ = stage
    clients = built.windows.clients[:6]
    dense, global_params = backend_for(stage, backend, built.cfg)
    sparse, _ = backend_for(stage, backend, with_federated(built.cfg, sparse_uploads=True))
    dense_update, dense_stats = round_update(dense, clients, global_params, 2)
    sparse_update, sparse_stats = round_update(sparse, clients, global_params, 2)
    for name in dense_update:
        torch.testing.assert_close(sparse_update[name], dense_update[name], atol=1e-7, rtol=0)
    assert sparse_stats["bytes_up"] < dense_stats["bytes_up"]
    # What is counted: each client's non-zero item rows with a 4-byte id, plus every other tensor.
    table = global_params[ITEM_ROWS]
    rest = sum(v.numel() * 4 for n, v in global_params.items() if n != ITEM_ROWS)
    rows = 0
    for user in clients:
        one = dense.train_clients([user], global_params, 2).update[ITEM_ROWS]
        rows += int(one.ne(0).any(1).sum())
    assert sparse_stats["bytes_up"] == rows * (table.shape[1] * 4 + 4) + len(clients) * rest


def corpus_run(monkeypatch, tmp_path, name: str, *sets: str, resume: bool = False) -> list[dict]:
    """A DP run of the bad-input corpus's valid base (6 users); its metrics lines."""
    monkeypatch.chdir(CORPUS / "unknown_key")
    folder = tmp_path / name
    args = ["--config", "../_base.yaml", "--quiet", *(["--resume", str(folder)] if resume else []),
            "--set", f"run_dir={folder}", "--set", "federated.dp={clip_norm: 0.1, noise_multiplier: 1.0, delta: null}",
            "--set", "federated.clients_per_round=3", "--set", "state_every=1"]
    assert run.main(args + [x for s in sets for x in ("--set", s)]) == 0
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_dp_run_reports_epsilon_every_round_and_resume_keeps_it(tmp_path, monkeypatch):
    full = corpus_run(monkeypatch, tmp_path, "full", "federated.rounds=3")
    eps = [r["epsilon"] for r in full]
    assert eps[0] < eps[1] < eps[2] and all(r["delta"] == pytest.approx(1 / 6) for r in full)
    assert eps[2] == pytest.approx(Accountant({"dp": dp(0.1, 1.0)}, users=6, per_round=3).epsilon(3))
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["privacy"]["dp"]["epsilon"] == eps[2] and summary["privacy"]["dp"]["rounds"] == 3

    corpus_run(monkeypatch, tmp_path, "resumed", "federated.rounds=2")
    resumed = corpus_run(monkeypatch, tmp_path, "resumed", "federated.rounds=3", resume=True)
    drop = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert drop(resumed) == drop(full)


def test_the_attack_command_reports_auc_and_the_touched_rows(tmp_path, monkeypatch, capsys):
    corpus_run(monkeypatch, tmp_path, "sparse", "federated.rounds=1", "federated.sparse_uploads=true")
    out = tmp_path / "attack.json"
    assert run.main(["attack", str(tmp_path / "sparse"), "--clients", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["clients"] >= 1 and result["upload"]["sparse_uploads"]
    assert set(result["scores"]) == {"row_norm", "row_sent"}
    # the corpus run clips at 0.1: no upload is longer
    norms = result["upload_norm"]
    assert 0 < norms["min"] <= norms["median"] <= norms["max"] <= 0.1 + 1e-6
    # Clipping scales an update, it does not hide which rows moved most.
    assert result["scores"]["row_norm"]["auc"] > 0.9
    assert "row_sent" in capsys.readouterr().out
    # the same trained model, attacked as its clients would upload under secure aggregation
    masked = tmp_path / "masked.json"
    assert run.main(["attack", str(tmp_path / "sparse"), "--clients", "4", "--json", str(masked),
                     "--set", "federated.secure_aggregation=true", "--set", "federated.sparse_uploads=false"]) == 0
    result = json.loads(masked.read_text())
    assert result["upload"]["secure_aggregation"] and not result["upload"]["sparse_uploads"]
    assert "upload_norm" not in result  # a masked upload's norm is the mask's
    assert result["scores"]["row_sent"]["auc"] == 0.5  # every row of a masked upload is non-zero
    # a sparse upload sends the touched rows with their ids, a masked one every row
    assert 0 < json.loads(out.read_text())["mb_up_per_client"] < result["mb_up_per_client"]
    # one table of both records, the masked upload's row first whatever the order they are named in
    capsys.readouterr()
    assert run.main(["attack", "--records", str(out), str(masked)]) == 0
    header, _, first, second = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("| upload | row_norm AUC (mean ± std) | row_norm precision@\\|history\\| | row_sent")
    assert first.startswith(f"| secure aggregation + DP clip 0.1, noise 1.0 | {result['scores']['row_norm']['auc']:.3f} ± ")
    assert first.endswith(f" | 0.500 ± 0.000 | {result['scores']['row_sent']['precision_at_history']:.3f} | "
                          f"{result['mb_up_per_client']:.3f} |")
    assert second.startswith("| sparse uploads + DP clip 0.1, noise 1.0 | ")
    assert run.main(["attack", "--records", str(tmp_path / "sparse" / "summary.json")]) == 2
    assert "not an attack record" in " ".join(capsys.readouterr().err.split())  # wrapped


def test_the_epsilons_privacy_md_quotes_are_the_pinned_accountants():
    """docs/PRIVACY.md's epsilons over 600 rounds on ML-1M (6,040 users, delta 1/6040) are what
    `Accountant` gives for them: the doc cannot drift from the accountant it names."""
    page = " ".join((ROOT / "docs" / "PRIVACY.md").read_text().split())
    quoted = {(1.5, 128): "9.31 (4)", (2.0, 128): "5.39 (4)", (0.5, 128): "5,398 (4)",
              (2.0, 512): "noise 2.0, 600 rounds spend epsilon 30.3", (1.0, 128): "noise 1.0, 36.0",
              (1.5, 1024): "spends epsilon 183 (1,024 clients)"}
    for (noise, per_round), text in quoted.items():
        epsilon = Accountant({"dp": {"clip_norm": 1.0, "noise_multiplier": noise, "delta": None}},
                             users=6040, per_round=per_round).epsilon(600)
        digits = text.split(" (")[0].split()[-1]
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        assert f"{epsilon:,.{decimals}f}" == digits and text in page, (noise, per_round, epsilon, text)


def test_privacy_md_quotes_its_records():
    """The numbers docs/PRIVACY.md gives outside its printed tables are those of the records in
    docs/results/privacy/: the cost table's measured rows and the prose's."""
    folder = ROOT / "docs" / "results" / "privacy"
    page = (ROOT / "docs" / "PRIVACY.md").read_text()
    flat = " ".join(page.split())
    attacks = {name: json.loads((folder / f"attack-ml1m-stage1-{name}.json").read_text())
               for name in ("none", "secure", "sparse", "dp1.5")}

    def test_metrics(record: str) -> dict:
        rows = {r["protocol"]: r for r in json.loads((folder / record).read_text()) if r["split"] == "test"}
        return {"full": rows["full"]["metrics"], "uni100": rows["uni100"]["metrics"],
                "mb": (rows["full"]["bytes_up_per_round"] or 0) / 1e6, "wall": rows["full"]["wall_seconds"]}

    [costs] = [table for table in tables_in(page) if table.startswith("| setting | epsilon at delta")]

    def row(label: str) -> list[str]:
        [line] = [line for line in costs.splitlines() if line.startswith(f"| {label} |")]
        return [cell.strip() for cell in line.strip("|").split("|")]

    none, popularity = test_metrics("ml1m-stage1-ce-seed2020.json"), test_metrics("ml1m-popularity.json")
    pair = lambda m: f"{m['hit@10']:.4f} / {m['ndcg@10']:.4f}"
    assert row("none")[2:5] == [pair(none["full"]), pair(none["uni100"]), f"{none['mb']:.1f}"]
    assert row("popularity (no training, for scale)")[2:4] == [pair(popularity["full"]), pair(popularity["uni100"])]
    dps = {noise: test_metrics(f"ml1m-stage1-ce-dp{noise}-seed2020.json") for noise in ("1.5", "2.0", "0.5")}
    for noise, recorded in dps.items():
        assert row(f"DP, clip 1.0, noise {noise}")[2:5] == [pair(recorded["full"]), pair(recorded["uni100"]),
                                                            f"{recorded['mb']:.1f}"]
    dp, dp2, dp05 = dps.values()
    for label, name in (("secure aggregation", "secure"), ("sparse uploads", "sparse")):
        assert row(label)[4] == f"{attacks[name]['mb_up_per_client'] * 128:.1f}"
    stage2 = {name: json.loads((folder / f"attack-ml1m-stage2-{name}.json").read_text())["scores"]
              for name in ("plain", "secure")}
    plain, masked = attacks["none"]["scores"], attacks["secure"]["scores"]
    norms = attacks["none"]["upload_norm"]
    quoted = [f"AUC {plain['row_norm']['auc']:.3f}; a masked one {masked['row_norm']['auc']:.3f}",
              f"puts {plain['row_norm']['precision_at_history']:.1%} of a user's history",
              f"(AUC {masked['row_norm']['auc']:.3f}, precision {masked['row_norm']['precision_at_history']:.3f}, "
              f"the base rate being {plain['row_sent']['precision_at_history']:.3f})",
              f"{attacks['sparse']['mb_up_per_client']:.3f} MB against {attacks['none']['mb_up_per_client']:.3f} MB",
              f"L2 norms from {norms['min']:.1f} to {norms['max']:.1f} (median {norms['median']:.1f}, "
              f"90th percentile {norms['p90']:.1f}",
              f"The record's wall time ({none['wall']:,.0f} s)",
              f"ranks {stage2['plain']['text_response']['precision_at_history']:.0%} of a user's history",
              f"the image score's {stage2['secure']['image_response']['auc']:.3f} is the public fact",
              f"noise 1.5 (epsilon 9.31), reaches {dp['full']['ndcg@10']:.4f}: "
              f"{dp['full']['ndcg@10'] / none['full']['ndcg@10']:.1%} of the non-private value",
              f"{dp['wall']:,.0f} s with one other run beside it", f"{dp2['wall']:,.0f} s with one other run",
              f"{dp05['wall']:,.0f} s with one other run",
              f"popularity level after 600 rounds ({dp05['full']['ndcg@10']:.4f})"]
    for text in quoted:
        assert text in flat, f"PRIVACY.md does not say {text!r}, which its records give"
