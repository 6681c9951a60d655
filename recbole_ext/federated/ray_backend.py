"""The `ray` backend: a fixed pool of Ray actors, each training a shard of every round's clients.

Each actor receives the model (frozen parameters, item features, memory table) and the training
windows once, when it starts, and keeps them. Per round the driver puts the global trainable
parameters into the object store once; every actor fetches them, trains its shard with the
`vectorized` backend and returns one pre-summed `RoundSums`, so a round moves the trainable
parameters twice per actor, not per client. In stage 2 the frozen backbone's states are computed
once on the driver and shared through the object store (zero-copy between actors on one node).

An actor trains on a GPU of its own share when `federated.ray_gpus_per_worker` > 0 (Ray makes the
share visible to it as its `cuda`), on its CPUs otherwise, whatever `device` the driver uses: the
model, windows and parameters travel on the CPU and each side moves them to its own device.

`federated.ray_address` null starts a local Ray with enough CPUs for the pool; any other value is
passed to `ray.init(address=...)` to join a running cluster ("auto" on a cluster node, or
"ray://head:10001" through Ray Client). The package travels to the workers as a runtime-env
`py_modules` entry, with the text of yamls/base.yaml (`defaults.ray_runtime_env`); the cluster's
Python must have this project's requirements installed.
"""
from __future__ import annotations

import copy
import logging
import os
import warnings

import numpy as np
import torch

from ..defaults import ray_runtime_env
from .aggregate import RoundSums
from .backbone_cache import BackboneCache
from .privacy import Uploads


def connect(address: str | None, cpus_needed: float) -> None:
    """Join `address`, or start a local Ray sized for the pool; reuse Ray if already initialised
    (for example inside a Ray Tune trial)."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = ray_runtime_env()
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
    else:
        # At least as many CPUs as the pool asks for, so a pool larger than the machine
        # oversubscribes instead of waiting forever for resources.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(cpus_needed))), include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)


def actor_seed(run_seed: int, actor: int) -> int:
    """The seed of an actor's torch generator (its dropout masks): a function of the run's seed and
    the actor's index, so actors never share a stream and a run repeats."""
    return int(np.random.SeedSequence([int(run_seed), int(actor)]).generate_state(1, np.uint64)[0])


class _Worker:
    """One actor: a `VectorizedBackend` over its own copy of the model."""

    def __init__(self, model, windows, settings, threads: int, seed: int, device: str):
        from .vectorized import VectorizedBackend

        torch.set_num_threads(threads)
        torch.manual_seed(seed)  # seeds the CUDA generators too
        self.device = device
        # Stage-2 states come from the driver (set_states), not from a cache of each actor's own.
        self.backend = VectorizedBackend(model.to(device), windows.to(device), settings, own_cache=False)

    def set_states(self, states: np.ndarray) -> None:
        # On the CPU, a view of the object-store buffer (read-only; nothing writes to it).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
            self.backend.shared_states = torch.from_numpy(states).to(self.device)

    def train(self, global_params: dict, clients: np.ndarray, round_seed: int, round_clients: np.ndarray) -> RoundSums:
        params = {name: value.to(self.device) for name, value in global_params.items()}
        return self.backend.train_clients(clients, params, round_seed, round_clients=round_clients).to("cpu")

    def rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device != "cpu":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"].clone().contiguous())
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"].clone().contiguous())


def shard_clients(clients: np.ndarray, work: np.ndarray, shards: int) -> list[np.ndarray]:
    """Split clients into `shards` groups of similar total work (largest first onto the least loaded)."""
    load = np.zeros(shards)
    groups = [[] for _ in range(shards)]
    for i in np.argsort(-work, kind="stable"):
        target = int(np.argmin(load))
        groups[target].append(clients[i])
        load[target] += work[i]
    return [np.array(sorted(g), dtype=clients.dtype) for g in groups]


class RayBackend:
    def __init__(self, model, windows, settings: dict):
        import ray

        fed = settings["federated"]
        self.windows = windows
        self.settings = settings
        self.device = windows.device
        self.workers_count = fed["ray_workers"]
        cpus, gpus = fed["ray_cpus_per_worker"], fed["ray_gpus_per_worker"]
        connect(fed["ray_address"], cpus * self.workers_count)
        self.cache = BackboneCache(model, windows.inputs) if model.backbone_frozen() else None
        self._shared_generation = 0
        host_model = model if self.device.type == "cpu" else copy.deepcopy(model).to("cpu")
        model_ref, windows_ref = ray.put(host_model), ray.put(windows.to("cpu"))
        worker = ray.remote(_Worker).options(num_cpus=cpus, num_gpus=gpus)
        self.workers = [worker.remote(model_ref, windows_ref, settings, max(1, int(cpus)),
                                      actor_seed(settings["seed"], index), "cuda" if gpus > 0 else "cpu")
                        for index in range(self.workers_count)]
        self._share_states()
        self.uploads = Uploads(settings)  # the empty sums the shards' are merged into

    def _share_states(self) -> None:
        """Compute (or recompute, if the backbone changed) the stage-2 states and hand them to the actors."""
        import ray

        if self.cache is None:
            return
        states = self.cache.states()
        if self._shared_generation != self.cache.generation:
            ref = ray.put(states.cpu().numpy())
            ray.get([w.set_states.remote(ref) for w in self.workers])
            self._shared_generation = self.cache.generation

    def train_clients(self, clients, global_params: dict, round_seed: int, progress: bool = False,
                      round_clients=None) -> RoundSums:
        """Each actor returns its shard's sums (under secure aggregation still masked: a shard's
        clients' masks pair with clients of other shards)."""
        import ray

        self._share_states()
        clients = np.asarray(clients)
        round_clients = clients if round_clients is None else np.asarray(round_clients)
        params_ref = ray.put({name: value.cpu() for name, value in global_params.items()})  # once per round
        shards = shard_clients(clients, self.windows.num_targets[clients].astype(float), self.workers_count)
        pending = [w.train.remote(params_ref, shard, round_seed, round_clients)
                   for w, shard in zip(self.workers, shards) if len(shard)]
        sums = self.uploads.zeros(global_params)
        for part in ray.get(pending):
            sums.merge(part.to(self.device))
        return sums

    def rng_states(self) -> dict:
        """{"cpu": [actors, state], and "cuda" for actors on GPUs}: every actor's torch generator
        states, saved with the run's resumable state so a resumed run draws the dropout masks an
        uninterrupted one would."""
        import ray

        states = ray.get([w.rng_state.remote() for w in self.workers])
        return {kind: torch.stack([s[kind] for s in states]) for kind in states[0]}

    def set_rng_states(self, states: dict | torch.Tensor) -> None:
        """`states` as `rng_states` gives them, or the [actors, state] tensor of the CPU generators
        that a run's state held before actors could run on GPUs."""
        import ray

        if isinstance(states, torch.Tensor):
            states = {"cpu": states}
        ray.get([w.set_rng_state.remote({kind: stack[i] for kind, stack in states.items()})
                 for i, w in enumerate(self.workers)])

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
