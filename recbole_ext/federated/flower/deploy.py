"""Run a stage on Flower's deployment engine from the command line (`federated.backend: flower`).

By default the command starts a SuperLink and `federated.flower.nodes` SuperNodes as local processes
on the loopback address, node i holding partition i of the users (the node-data file the command
writes for it, and nothing else); with `federated.flower.address` it submits to a SuperLink that
already runs there (its SuperNodes started by their operators, docs/DEPLOY.md). It submits the Flower App in `app/` with `flwr run`, follows the run folder the ServerApp
writes, and stops what it started, also when the run fails or is interrupted.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from tqdm import tqdm

from ...config import dump
from ...errors import UserError

PROJECT = Path(__file__).resolve().parents[3]  # the folder holding recbole_ext/
APP = PROJECT / "recbole_ext" / "flower_app"  # the Flower App `flwr run` submits
BIN = Path(sys.executable).parent
CONNECTION = "ur4rec"
FINISHED = "finished:"


def flower_env(home: Path, threads: int | None = None) -> dict:
    """The environment of every Flower process: this Python's tools first on PATH (Flower finds its
    executors there), the project importable, Flower's own home, and nothing that calls home."""
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH")) if p))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    home.mkdir(parents=True, exist_ok=True)
    return env


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise UserError(f"federated.backend: flower needs Flower's {name} next to {sys.executable}; install the "
                        f"option with `make flower` (requirements-flower.txt)")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string is a TOML basic string


class Deployment:
    """The SuperLink and SuperNodes this command started (none when it joins `address`), and the flwr
    command line's connection to the SuperLink."""

    def __init__(self, flower: dict, work: Path, node_files: list[Path] = ()):
        """`node_files`: the node-data file of each partition, for the SuperNodes it starts."""
        self.flower, self.work, self.node_files, self.processes = flower, work, list(node_files), []
        self.address = flower["address"]

    def __enter__(self) -> "Deployment":
        try:
            if self.address is None:
                self._start_local()
            self._connect()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def _wait_healthy(self, name: str, process: subprocess.Popen, port: int) -> None:
        deadline = time.monotonic() + self.flower["start_timeout"]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise UserError(f"Flower's {name} exited with code {process.returncode} while starting; its log: "
                                f"{self.work / (name + '.log')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise UserError(f"Flower's {name} did not answer on 127.0.0.1:{port} within "
                        f"{self.flower['start_timeout']} s (federated.flower.start_timeout)")

    def _start_local(self) -> None:
        port = free_port()
        link = self._spawn("superlink", [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                         str(port), "--disable-runtime-dependency-installation"],
                           flower_env(self.work / "home-superlink"))
        self._wait_healthy("superlink", link, port)
        self.address = f"127.0.0.1:{port}"
        started = []
        for index, data in enumerate(self.node_files):
            node_port = free_port()
            node = self._spawn(f"supernode-{index}", [
                tool("flower-supernode"), "--insecure", "--superlink", self.address, "--host", "127.0.0.1",
                "--port", str(node_port), "--node-config", f"node-data={toml_value(str(data))}"],
                flower_env(self.work / f"home-supernode-{index}", threads=1))
            started.append((index, node, node_port))
        for index, node, node_port in started:
            self._wait_healthy(f"supernode-{index}", node, node_port)

    def _connect(self) -> None:
        home = self.work / "home-cli"
        self.cli_env = flower_env(home)
        certificates = self.flower["root_certificates"]
        security = "insecure = true" if certificates is None else \
            f"insecure = false\nroot-certificates = {toml_value(str(Path(certificates).resolve()))}"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "{self.address}"\n{security}\n')

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([tool("flwr"), *args], env=self.cli_env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"`flwr {args[0]}` got no answer from the SuperLink at {self.address} within "
                            f"{timeout:.0f} s") from None

    def submit(self, run_config: dict) -> int:
        text = " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())
        answer = self.flwr("run", str(APP), CONNECTION, "--run-config", text, "--format", "json",
                           timeout=self.flower["start_timeout"])
        try:
            return int(json.loads(answer.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            tls = "" if self.flower["root_certificates"] else \
                " (a SuperLink that runs with TLS needs federated.flower.root_certificates)"
            raise UserError(f"the SuperLink at {self.address} did not accept the run{tls}: "
                            f"{(answer.stdout + answer.stderr).strip()[-1500:]}") from None

    def status(self, run_id: int) -> str:
        answer = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(answer.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "unknown"

    def log(self, run_id: int) -> str:
        answer = self.flwr("log", str(run_id), CONNECTION, "--show")
        return answer.stdout + answer.stderr

    def stop(self) -> None:
        # SuperNodes first: one that gets SIGTERM leaves the SuperLink at once.
        stop_all(self.processes[::-1])
        self.processes = []


def stop_all(processes: list[subprocess.Popen]) -> None:
    """Stop `processes` and everything they started: the SuperLink launches the ServerApp through a
    process in a session of its own, and a ServerApp whose SuperLink is gone lives on, still writing
    the run folder. SIGTERM first, SIGKILL for what is left after 10 s."""
    tree = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(process.pid)
            tree += [root, *root.children(recursive=True)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=10)
    for process in processes:
        process.wait()


def rounds_done(run_dir: str) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"round"' in line)


def check_connection(flower: dict, where: str) -> None:
    """`federated.flower.root_certificates` names a file, and a SuperLink that `address` gives."""
    certificates = flower["root_certificates"]
    if certificates is None:
        return
    if flower["address"] is None:
        raise UserError(f"{where}: federated.flower.root_certificates is for a SuperLink given by "
                        f"federated.flower.address; the one this command starts runs on 127.0.0.1 without TLS")
    if not Path(certificates).is_file():
        raise UserError(f"{where}: federated.flower.root_certificates: {certificates} is not a file (the PEM "
                        f"certificate of the CA that signed the SuperLink's certificate)")


def run_stage(cfg: dict, where: str, resume: bool, overwrite: bool, show_progress: bool,
              write_nodes) -> None:
    """Deploy, run the stage as a Flower run, and return once its ServerApp has written the run folder's
    summary; a failed run is a UserError that quotes the ServerApp's log. `write_nodes(folder)` writes
    the node-data files of the nodes started here and returns their paths (nodes.write_node_data)."""
    flower = cfg["federated"]["flower"]
    check_connection(flower, where)
    work = Path(tempfile.mkdtemp(prefix="ur4rec-flower-"))
    config_file = work / "stage.yaml"
    config_file.write_text(dump(cfg))
    failed = True
    # a plain `kill` must stop the processes this command started too, not orphan them
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        node_files = []
        if flower["address"] is None:  # the nodes started here hold their partitions' data, nothing more
            node_files = write_nodes(work / "node-data")
        with Deployment(flower, work, node_files) as deployment:
            run_id = deployment.submit({"config-file": str(config_file), "where": where, "resume": resume,
                                        "overwrite": overwrite})
            bar = tqdm(total=cfg["federated"]["rounds"], desc=f"rounds (Flower run {run_id})", unit="round",
                       disable=not show_progress)
            while not (status := deployment.status(run_id)).startswith(FINISHED):
                bar.update(rounds_done(cfg["run_dir"]) - bar.n)
                time.sleep(1.0)
            bar.update(rounds_done(cfg["run_dir"]) - bar.n)
            bar.close()
            if status != FINISHED + "completed":
                log = deployment.log(run_id).strip().splitlines()
                print("\n".join(log[-30:]), file=sys.stderr)
                raise UserError(f"Flower run {run_id} ended {status}; above, the end of its ServerApp's log; "
                                f"the processes' logs are in {work}")
        failed = False
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not failed:
            shutil.rmtree(work, ignore_errors=True)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)
