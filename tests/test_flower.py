"""The `flower` backend (recbole_ext/federated/flower): a stage over Flower's deployment engine, on
loopback processes this test starts and stops through run.py. Skipped without the optional install
(`make flower`; CI has it)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("flwr")

from conftest import ROOT, recbole_example_dir  # noqa: E402
from test_privacy import stage  # noqa: E402,F401  (the tiny stage-1 fixture)
from recbole_ext.errors import UserError  # noqa: E402
from recbole_ext.federated.aggregate import RoundSums  # noqa: E402
from recbole_ext.federated.flower import records  # noqa: E402
from recbole_ext.federated.flower.backend import FlowerBackend, merge_checked  # noqa: E402
from recbole_ext.federated.flower.deploy import flower_env, free_port, stop_all, tool  # noqa: E402

NO_DROPOUT = ["--set", "model.hidden_dropout_prob=0.0", "--set", "model.attn_dropout_prob=0.0"]
SMOKE = ["--config", "yamls/smoke.yaml", "--set", f"data.path={recbole_example_dir()}"]  # ML-100K in RecBole's package


def run_py(*args: str, timeout: float = 300, prog: str | None = None) -> subprocess.CompletedProcess:
    """run.py with `args` (after the subcommand `prog`, if given)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *([prog] if prog else []), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("modulus", [None, 2 ** 40])
def test_a_nodes_sums_arrive_as_they_left(modulus):
    dtype = torch.float32 if modulus is None else torch.int64
    update = {"item_embedding.weight": torch.arange(12, dtype=dtype).reshape(4, 3) * 3,
              "LayerNorm.bias": torch.arange(3, dtype=dtype)}
    sums = RoundSums(update, {"loss": torch.tensor(2.5), "gate": torch.tensor([0.25, 0.75])}, 7.0, 3, 1234, modulus)
    back = records.read_sums(records.sums_reply(sums), torch.device("cpu"))
    assert back.update.keys() == update.keys()
    for name, value in update.items():
        assert torch.equal(back.update[name], value) and back.update[name].dtype == value.dtype
    assert torch.equal(back.stats["gate"], sums.stats["gate"]) and float(back.stats["loss"]) == 2.5
    assert (back.weight, back.clients, back.bytes_up, back.modulus) == (7.0, 3, 1234, modulus)


def node_sums(shift: float, clients: int = 2, **changes) -> RoundSums:
    update = {"item_embedding.weight": torch.full((4, 3), shift), "LayerNorm.bias": torch.full((3,), shift)}
    update.update(changes)
    return RoundSums(update, {"loss": torch.tensor(shift)}, float(clients), clients, 100)


GLOBAL = {"item_embedding.weight": torch.zeros(4, 3), "LayerNorm.bias": torch.zeros(3)}


@pytest.mark.parametrize("bad, reason", [
    (node_sums(5.0, **{"LayerNorm.bias": torch.zeros(4)}), "LayerNorm.bias has shape (4,), not (3,)"),
    (node_sums(5.0, **{"item_embedding.weight": torch.full((4, 3), float("nan"))}), "non-finite"),
    (node_sums(5.0, **{"extra.weight": torch.zeros(1)}), "do not match"),
    (RoundSums(dict(GLOBAL), {"loss": torch.tensor(float("inf"))}, 2.0, 2, 100), "loss statistic is not finite"),
])
def test_a_nodes_unusable_answer_is_dropped_and_the_round_goes_on_without_it(bad, reason):
    answers = [(0, 11, node_sums(1.0)), (1, 12, bad), (2, 13, node_sums(2.0, clients=3))]
    total, dropped = merge_checked(answers, GLOBAL, RoundSums.zeros(GLOBAL))
    assert [(d["partition"], d["node"]) for d in dropped] == [(1, 12)] and reason in dropped[0]["reason"]
    assert (total.weight, total.clients) == (5.0, 5)
    assert torch.equal(total.update["item_embedding.weight"], torch.full((4, 3), 3.0))


def test_a_node_that_failed_or_gave_no_reply_is_dropped_with_the_others_summed():
    lost = [{"partition": 0, "node": 11, "clients": 4, "reason": "it gave no reply within 600 s"}]
    total, dropped = merge_checked([(1, 12, node_sums(1.0)), (2, 13, node_sums(2.0))], GLOBAL,
                                   RoundSums.zeros(GLOBAL), lost)
    assert dropped == lost and (total.weight, total.clients) == (4.0, 4)
    with pytest.raises(UserError, match=r"node 11 \(partition 0\): it gave no reply.*no node's update was usable"):
        merge_checked([], GLOBAL, RoundSums.zeros(GLOBAL), lost)


def test_dropping_a_node_is_refused_under_secure_aggregation_and_when_none_is_left():
    masked = RoundSums({n: torch.zeros_like(v, dtype=torch.int64) for n, v in GLOBAL.items()}, modulus=2 ** 40)
    bad = RoundSums({n: torch.zeros(1, dtype=torch.int64) for n in GLOBAL}, {}, 1.0, 1, 8, 2 ** 40)
    with pytest.raises(UserError, match=r"node 12 \(partition 1\).*masks do not cancel"):
        merge_checked([(1, 12, bad)], GLOBAL, masked)
    with pytest.raises(UserError, match="no node's update was usable"):
        merge_checked([(0, 11, node_sums(float("nan")))], GLOBAL, RoundSums.zeros(GLOBAL))


def test_a_nodes_other_data_is_named_in_the_refusal():
    ours = {"items": 100, "users": 4, "positions": 10, "digest": "aaaa"}
    assert records.data_mismatch(dict(ours), ours) is None
    said = records.data_mismatch({**ours, "positions": 9, "digest": "bbbb"}, ours)
    assert "its data has 100 items, 4 users, 9 training positions (digest bbbb)" in said
    assert "the run's 100 items, 4 users, 10 training positions (digest aaaa)" in said


def node_data_files(folder: Path, nodes: int, *sets: str) -> list[Path]:
    """The smoke run's node-data files for `nodes` SuperNodes, as `run.py node-data` writes them."""
    result = run_py(*SMOKE, "--set", f"federated.flower.nodes={nodes}", *sets, "--out", str(folder), prog="node-data")
    assert result.returncode == 0, result.stderr[-3000:]
    return [folder / f"node-{index}.npz" for index in range(nodes)]


def test_the_backend_outside_a_serverapp_is_refused():
    with pytest.raises(UserError, match="inside a Flower ServerApp"):
        FlowerBackend(None, None, {})


def rounds_in(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def started_until_a_round(args: list, run_dir: Path) -> tuple[subprocess.Popen, list]:
    """run.py with `args`, left running once it has added a round to metrics.jsonl; and the processes
    it had started by then."""
    before = rounds_in(run_dir)
    # pytest-xdist's workers ignore SIGINT, and a child inherits that: the command gets Python's own
    # Ctrl-C handling back, as from a shell
    command = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while rounds_in(run_dir) <= before:
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()[0][-3000:]
        time.sleep(0.2)
    return command, psutil.Process(command.pid).children(recursive=True)


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def survivors(started: list) -> list:
    return [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.deployment
def test_a_deployment_that_loses_its_serverapp_or_is_interrupted_resumes_to_the_vectorized_numbers(tmp_path):
    """Four smoke rounds on 2 SuperNodes and two faults. The ServerApp process alone is killed
    (SIGKILL) after a round: the command reports the failed Flower run (exit 2). Resumed, the command
    is interrupted (Ctrl-C) after a further round. Each time every process the command started is
    gone and no summary is written. Resumed again, the run ends with the vectorized backend's global
    parameters to 1e-5 (each node's clients are summed apart) and its per-round losses."""
    rounds = ["--set", "federated.rounds=4"]
    vectorized = run_py(*SMOKE, *rounds, "--set", f"run_dir={tmp_path / 'vectorized'}",
                        "--set", "federated.backend=vectorized", "--quiet", *NO_DROPOUT)
    assert vectorized.returncode == 0, vectorized.stderr[-3000:]
    run_dir = tmp_path / "flower"
    flower = [*SMOKE, *rounds, "--set", "federated.backend=flower", "--set", "federated.flower.nodes=2",
              "--set", "state_every=1", "--quiet", *NO_DROPOUT]
    command, started = started_until_a_round([*flower, "--set", f"run_dir={run_dir}"], run_dir)
    assert len(started) >= 4  # the SuperLink, 2 SuperNodes, the ServerApp (and the flwr CLI's calls)
    [server] = [p for p in started if "flwr-serverapp" in command_line(p)]
    server.kill()
    out, _ = command.communicate(timeout=300)
    assert command.returncode == 2 and "ended" in out, out[-3000:]
    assert not survivors(started)
    assert 1 <= rounds_in(run_dir) < 3 and not (run_dir / "summary.json").exists()

    command, started = started_until_a_round([*flower, "--resume", str(run_dir)], run_dir)
    command.send_signal(signal.SIGINT)
    command.communicate(timeout=60)
    assert command.returncode == -signal.SIGINT  # KeyboardInterrupt ends Python by the signal
    assert not survivors(started)
    assert rounds_in(run_dir) < 4 and not (run_dir / "summary.json").exists()

    resumed = run_py(*flower, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "run folder:" in resumed.stdout
    ours = torch.load(run_dir / "state.pt", weights_only=False)["model"]
    reference = torch.load(tmp_path / "vectorized" / "state.pt", weights_only=False)["model"]
    worst = max(float((ours[k].float() - reference[k].float()).abs().max()) for k in reference)
    assert 0 < max(float((reference[k].float()).abs().max()) for k in reference)
    assert worst < 1e-5, f"the flower run's parameters differ from the vectorized run's by {worst:.2e}"
    logs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("vectorized", "flower")]
    assert [r["round"] for r in logs[1]] == [r["round"] for r in logs[0]] == [1, 2, 3, 4]
    for theirs, mine in zip(*logs):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["dropped_nodes"] == [] and "dropped_nodes" not in theirs
        # down: at least one node's float32 copy of the trainable parameters
        assert mine["wire_bytes"]["down"] > 4 * mine["trainable_params"] and mine["wire_bytes"]["up"] > 0


def test_an_unreachable_superlink_is_a_clear_error_that_writes_nothing(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_py(*SMOKE, "--set", f"run_dir={tmp_path / 'run'}", "--set",
                    "federated.backend=flower", "--set", f"federated.flower.address={address}", timeout=120)
    assert result.returncode == 2
    assert address in result.stderr and "SuperLink" in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


def tls_certificates(folder: Path) -> dict:
    """A CA, and a certificate it signed for 127.0.0.1 with its key: {"ca", "server", "server-key"} PEM paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = lambda text: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def certificate(subject: str, key, ca_key, is_ca: bool):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("test CA"))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        if not is_ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = {part: folder / f"{part}.pem" for part in ("ca", "server", "server-key")}
    paths["ca"].write_bytes(certificate("test CA", ca_key, ca_key, True))
    paths["server"].write_bytes(certificate("127.0.0.1", key, ca_key, False))
    paths["server-key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


@pytest.mark.slow
@pytest.mark.deployment
def test_over_tls_a_supernode_with_other_data_is_refused_at_the_start_and_named(tmp_path):
    """An operator's deployment (docs/DEPLOY.md): a SuperLink with a TLS certificate and two SuperNodes
    that trust its CA, node 1 holding its partition of a version of the data without one of its users.
    Without `root_certificates` the command cannot submit and says what is missing; with it, the run
    is submitted over TLS, both nodes answer over TLS, and the run is refused before its first round,
    naming node 1's partition."""
    files = node_data_files(tmp_path / "nodes", 2)
    files[1] = node_data_files(tmp_path / "other", 2, "--set", "data.max_users=38")[1]  # user 39 is node 1's
    tls = tls_certificates(tmp_path)
    env = flower_env(tmp_path / "home", threads=1)
    port = free_port()
    processes = [subprocess.Popen([tool("flower-superlink"), "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile",
                                   str(tls["server"]), "--ssl-keyfile", str(tls["server-key"]), "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deploy = [*SMOKE, "--set", f"run_dir={tmp_path / 'run'}", "--set", "federated.backend=flower", "--set",
              f"federated.flower.address=127.0.0.1:{port}", "--set", "federated.flower.nodes=2", "--set",
              "federated.flower.start_timeout=120.0"]
    try:
        for index, data in enumerate(files):
            processes.append(subprocess.Popen(
                [tool("flower-supernode"), "--root-certificates", str(tls["ca"]), "--superlink", f"127.0.0.1:{port}",
                 "--port", str(free_port()), "--node-config", f'node-data="{data}"'],
                env=flower_env(tmp_path / f"home-{index}", threads=1), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        plain = run_py(*deploy, timeout=200)
        result = run_py(*deploy, "--set", f"federated.flower.root_certificates={tls['ca']}", timeout=400)
    finally:
        stop_all(processes)  # the ServerApp too
    said = " ".join(plain.stderr.split())  # the message is wrapped
    assert plain.returncode == 2 and "with TLS needs federated.flower.root_certificates" in said, said[-2000:]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "(partition 1) does not hold the run's data" in result.stderr
    assert "(partition 0)" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


SECAGGPLUS = ["--set", "federated.flower.secaggplus=true", "--set", "federated.server_optimizer=sgd",
              "--set", "federated.server_lr=1.0", *NO_DROPOUT]  # server SGD at rate 1: the parameters move by the mean update


def test_what_a_secaggplus_server_receives_of_one_node_tells_the_attack_nothing(stage):
    """`run.py attack`'s view under SecAgg+: the user's node's masked vector from a round of Flower's
    workflow and client mod (in this process). Its item rows score at chance, where the same users'
    plain uploads name their histories."""
    from test_privacy import attack_aucs, with_federated

    built, _ = stage
    clients = built.windows.clients[:12]
    secure = with_federated(built.cfg, backend="flower", flower={**built.cfg["federated"]["flower"], "secaggplus": True})
    results = {"plain": attack_aucs(stage, built.cfg, clients)[0]}
    results["secaggplus"], views = attack_aucs(stage, secure, clients)
    numel = sum(v.numel() for v in views[0][0].values())
    for view, size in views:  # ring elements, every one of them sent
        assert size >= 4 * numel
        assert not any(bool((v % 1).any()) for v in view.values())
    assert results["plain"]["row_norm"] > 0.9
    assert abs(results["secaggplus"]["row_norm"] - 0.5) < 0.08
    assert results["secaggplus"]["row_sent"] == 0.5  # every row of a masked vector is non-zero


@pytest.mark.slow
@pytest.mark.deployment
def test_secaggplus_gives_the_plain_mean_within_its_quantization_bound(tmp_path):
    """One round of DP-FedAvg through Flower's SecAgg+ on 3 loopback SuperNodes against the simulated
    masks of the vectorized backend (both weigh clients uniformly; the noise is the round's, the same
    in both): the parameters, moved by the noised mean update, agree within the bound that
    secaggplus.error_bound states, the error is not zero (it was quantized), and the accountant
    spends the same epsilon."""
    from recbole_ext.config import load_config
    from recbole_ext.federated.flower.secaggplus import error_bound

    one_round = [*SMOKE, "--set", "federated.rounds=1", "--quiet", *SECAGGPLUS, "--set", "federated.dp.clip_norm=1.0",
                 "--set", "federated.dp.noise_multiplier=0.1"]
    plain = run_py(*one_round, "--set", f"run_dir={tmp_path / 'plain'}", "--set", "federated.secure_aggregation=true",
                   "--set", "federated.flower.secaggplus=false")
    assert plain.returncode == 0, plain.stderr[-3000:]
    secure = run_py(*one_round, "--set", f"run_dir={tmp_path / 'secaggplus'}", "--set", "federated.backend=flower",
                    "--set", "federated.flower.nodes=3", timeout=600)
    assert secure.returncode == 0, secure.stdout[-3000:] + secure.stderr[-3000:]
    ours = torch.load(tmp_path / "secaggplus" / "state.pt", weights_only=False)["model"]
    reference = torch.load(tmp_path / "plain" / "state.pt", weights_only=False)["model"]
    worst = max(float((ours[k].double() - reference[k].double()).abs().max()) for k in reference)
    flower = load_config(ROOT / "yamls" / "smoke.yaml")["federated"]["flower"]
    bound = error_bound(flower, 3) + 1e-7  # and float32's rounding of parameters of about 0.1
    assert 0 < worst < bound, f"SecAgg+ moved the parameters {worst:.2e} from the plain mean (bound {bound:.2e})"
    plain_round, secure_round = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
                                 for name in ("plain", "secaggplus")]
    assert plain_round["epsilon"] == secure_round["epsilon"] > 0
    # the masked vectors (ring elements) come back up, not float32 parameters
    assert secure_round["wire_bytes"]["up"] > 4 * secure_round["trainable_params"]


def operator_nodes(tmp_path: Path, nodes: int, drop: int) -> tuple[str, list]:
    """A SuperLink and `nodes` SuperNodes started as an operator would, the last one drilled to leave
    in round `drop`: (the SuperLink's address, the processes, SuperLink first)."""
    files = node_data_files(tmp_path / "nodes", nodes)
    port = free_port()
    processes = [subprocess.Popen([tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                                  env=flower_env(tmp_path / "home", threads=1), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)]
    for index in range(nodes):
        node_config = f'node-data="{files[index]}"' + (f" drop-at-round={drop}" if index == nodes - 1 else "")
        processes.append(subprocess.Popen(
            [tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
             "--node-config", node_config], env=flower_env(tmp_path / f"home-{index}", threads=1),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return f"127.0.0.1:{port}", processes


@pytest.mark.slow
@pytest.mark.deployment
@pytest.mark.parametrize("secure, reason", [([*NO_DROPOUT], "^it failed: .*Node Unavailable"),
                                            (SECAGGPLUS, "recovered its masks")], ids=["plain", "secaggplus"])
def test_a_supernode_killed_mid_round_leaves_a_round_that_completes_without_it(tmp_path, secure, reason):
    """Three SuperNodes started as an operator would; the third is killed in round 1 (its
    `drop-at-round` drill) when its train message arrives, under SecAgg+ after it shared its keys and
    before it sent its masked vector. The round completes on the other two nodes' clients (SecAgg+
    recovers the dropped node's masks from the others' shares), and metrics.jsonl names the node and
    why: without SecAgg+, the SuperLink's answer for a node whose heartbeats stopped."""
    address, processes = operator_nodes(tmp_path, 3, drop=1)
    try:
        result = run_py(*SMOKE, *secure, "--set", f"run_dir={tmp_path / 'run'}", "--set", "federated.rounds=1",
                        "--set", "federated.backend=flower", "--set", f"federated.flower.address={address}",
                        "--set", "federated.flower.nodes=3", "--set", "federated.flower.round_timeout=120.0",
                        "--set", "federated.flower.start_timeout=120.0", "--quiet", timeout=900)
        assert processes[3].poll() is not None  # the drill killed that SuperNode
    finally:
        stop_all(processes)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    [drop] = rounds[0]["dropped_nodes"]
    assert drop["partition"] == 2 and drop["clients"] > 0 and re.search(reason, drop["reason"])
    assert np.isfinite(rounds[0]["loss"])
    assert not [p for p in psutil.process_iter(["cmdline"]) if address in " ".join(p.info["cmdline"] or [])]
