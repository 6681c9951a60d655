"""What a client uploads, and what the server can learn from it.

`Uploads` turns each client's parameter change into the upload the configuration sends and adds it
into the round's sums; every backend calls it on every client's own change, so there is one
implementation of each option:

* `federated.dp` (DP-FedAvg, McMahan et al., ICLR 2018): each client's change is clipped to
  `clip_norm` in L2 over all trainable tensors and weighs 1 (uniform), and the server adds Gaussian
  noise of std `noise_multiplier * clip_norm` to the sum before dividing by the number of clients
  (server.aggregate). The server optimizer only post-processes that mean. `Accountant` reports the (epsilon, delta) spent.
* `federated.secure_aggregation` (a simulation of Bonawitz et al., CCS 2017): updates are encoded as
  fixed-point integers modulo 2^62 and each client adds pairwise masks, uniform over that ring, that
  cancel in the sum; the server-side sums only ever hold masked values, and a single upload is
  uniformly random. Pair seeds stand in for the key agreement; there is no dropout recovery.
  The `flower` backend has the real protocol instead (`federated.flower.secaggplus`: Flower's SecAgg+,
  federated/flower/secaggplus.py); it weighs clients uniformly too.
* `federated.sparse_uploads`: a client sends only the item-embedding rows it changed (ids + rows)
  and the dense rest; `bytes_up` counts what is sent.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError
from .aggregate import RoundSums

ITEM_ROWS = "item_embedding.weight"  # the tensor whose non-zero rows name the items a client touched
MODULUS = 2 ** 62  # the secure-aggregation ring; sums of two residues stay inside int64
FIXED_POINT = 2.0 ** 32  # encoding scale: rounding error 2^-33 per entry, below float32's for updates < 1
ID_BYTES = 4  # a sparse row's item id, sent as int32
SECAGGPLUS_RING = 2 ** 32  # the ring of Flower's SecAgg+ masked sums (its default)
MASK_STREAM, NOISE_STREAM = 0x6D61736B, 0x6E6F6973  # keep the masks' and the noise's seeds apart


def check_settings(cfg: dict, where: str) -> None:
    """Combinations of the privacy options that cannot work (each key is checked in config.py)."""
    fed = cfg["federated"]
    if fed["secure_aggregation"] and fed["sparse_uploads"]:
        raise UserError(f"{where}: federated.secure_aggregation and federated.sparse_uploads cannot be combined: "
                        "pairwise masks cancel only over a vector every client sends whole, and the ids of a "
                        "client's touched rows would go to the server in the clear")
    if fed["secure_aggregation"] and fed["client_fraction"] is None and fed["clients_per_round"] < 2:
        raise UserError(f"{where}: federated.secure_aggregation needs federated.clients_per_round >= 2 "
                        f"(a sum over one client is that client's update)")
    check_secaggplus(fed, where)


def check_secaggplus(fed: dict, where: str) -> None:
    """The settings of Flower's SecAgg+ (federated.flower.secaggplus) that cannot work."""
    flower = fed["flower"]
    if not flower["secaggplus"]:
        return
    if fed["backend"] != "flower":
        raise UserError(f"{where}: federated.flower.secaggplus needs federated.backend: flower "
                        f"(it is {fed['backend']!r}; the other backends have federated.secure_aggregation)")
    if fed["secure_aggregation"] or fed["sparse_uploads"]:
        key = "secure_aggregation" if fed["secure_aggregation"] else "sparse_uploads"
        raise UserError(f"{where}: federated.flower.secaggplus cannot be combined with federated.{key}: "
                        f"SecAgg+ replaces the simulated masks, and masks cancel only over whole vectors")
    nodes, shares, threshold = flower["nodes"], flower["shares"], flower["threshold"]
    if nodes < 2:
        raise UserError(f"{where}: federated.flower.secaggplus needs federated.flower.nodes >= 2 "
                        f"(a sum over one node is that node's update)")
    if threshold > shares:
        raise UserError(f"{where}: federated.flower.threshold ({threshold}) is above federated.flower.shares "
                        f"({shares}): a secret shared among {shares} nodes cannot need {threshold} shares")
    if threshold > nodes:
        raise UserError(f"{where}: federated.flower.threshold ({threshold}) is above the {nodes} nodes "
                        f"(federated.flower.nodes) a round can sample: no round could be unmasked")
    if threshold < 2:
        raise UserError(f"{where}: federated.flower.threshold must be at least 2 (one share would reveal the secret)")
    if nodes * flower["quantization_range"] > SECAGGPLUS_RING:
        raise UserError(f"{where}: federated.flower.quantization_range ({flower['quantization_range']}) times the "
                        f"{nodes} nodes exceeds the ring of 2^32: their masked sum would wrap")


def dp_enabled(fed: dict) -> bool:
    return fed["dp"]["clip_norm"] is not None


def clip_(deltas: dict, clip_norm: float) -> torch.Tensor:
    """Scale each client's change (dim 0 of every tensor) to L2 norm <= clip_norm over all tensors, in
    place; returns the norms before clipping [C]."""
    norms = torch.stack([d.reshape(len(d), -1).double().pow(2).sum(1) for d in deltas.values()]).sum(0).sqrt()
    factor = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    for d in deltas.values():
        d.mul_(factor.to(d.dtype).view(-1, *([1] * (d.ndim - 1))))
    return norms


def encode(values: torch.Tensor) -> torch.Tensor:
    """Fixed-point residues modulo MODULUS (int64) of float values."""
    scaled = torch.round(values.double() * FIXED_POINT)
    if bool((scaled.abs() >= MODULUS / 4).any()):
        raise ValueError("an update is too large for the secure-aggregation ring")
    return torch.remainder(scaled.to(torch.int64), MODULUS)


def decode(residues: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float values of residues (the upper half of the ring are negative numbers)."""
    signed = torch.where(residues >= MODULUS // 2, residues - MODULUS, residues)
    return (signed.double() / FIXED_POINT).to(dtype)


def mask_partners(client: int, round_clients) -> list[tuple[int, int]]:
    """(partner, sign) pairs of `client`'s masks: its neighbours on a ring of the round's clients in id
    order, k = 2 ceil(log2 C) of them (every other client when C is small), as SecAgg+ (Bell et al.,
    CCS 2020) replaces the complete graph; the lower id adds the pair's mask, the higher subtracts it."""
    ring = sorted(int(c) for c in round_clients)
    size = len(ring)
    reach = min((size - 1) // 2 + (size - 1) % 2, math.ceil(math.log2(size))) if size > 1 else 0
    at = ring.index(int(client))
    partners = {ring[(at + step) % size] for step in range(-reach, reach + 1) if step} - {int(client)}
    return [(p, 1 if int(client) < p else -1) for p in sorted(partners)]


def pair_mask(round_seed: int, a: int, b: int, shape) -> torch.Tensor:
    """The mask shared by clients a and b in a round (in a deployment, from their agreed key)."""
    low, high = sorted((int(a), int(b)))
    seed = np.random.SeedSequence([int(round_seed), low, high, MASK_STREAM]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, MODULUS, shape, dtype=torch.int64, generator=generator)


class Uploads:
    """The round's uploads as `federated` configures them, added into a `RoundSums`."""

    def __init__(self, settings: dict):
        fed = settings["federated"]
        self.clip_norm = fed["dp"]["clip_norm"]
        self.noise_multiplier = fed["dp"]["noise_multiplier"]
        self.secure = fed["secure_aggregation"]
        self.sparse = fed["sparse_uploads"]
        # A weight that counts a client's targets tells the server (or the sum's sensitivity) about it.
        self.uniform = self.secure or fed["flower"]["secaggplus"] or self.clip_norm is not None
        self.per_client = self.uniform or self.sparse  # every client's change must be formed on its own

    def weights(self, targets) -> torch.Tensor:
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        return torch.ones_like(targets) if self.uniform else targets

    def zeros(self, global_params: dict) -> RoundSums:
        if not self.secure:
            return RoundSums.zeros(global_params)
        return RoundSums({n: torch.zeros_like(v, dtype=torch.int64) for n, v in global_params.items()},
                         modulus=MODULUS)

    def add(self, sums: RoundSums, deltas: dict, clients, weights: torch.Tensor, round_seed: int,
            round_clients) -> None:
        """Add the uploads of `clients`, whose changes `deltas` (name -> [C, ...], overwritten) are,
        weighted by `weights` [C]; `round_clients`: every client of the round (the mask partners)."""
        if self.clip_norm is not None:
            clip_(deltas, self.clip_norm)
        sums.bytes_up += sum(self.upload_bytes(deltas, c) for c in range(len(clients)))
        if not self.secure:
            for name, d in deltas.items():
                sums.update[name] += torch.einsum("c,c...->...", weights.to(d.dtype), d)
            return
        for c, client in enumerate(clients):
            for name, d in deltas.items():
                upload = encode(weights[c] * d[c])
                for partner, sign in mask_partners(client, round_clients):
                    mask = pair_mask(round_seed, client, partner, d[c].shape).to(upload.device)
                    upload = torch.remainder(upload + sign * mask, MODULUS)
                sums.update[name] = torch.remainder(sums.update[name] + upload, MODULUS)

    def add_summed(self, sums: RoundSums, summed: dict, clients: int, dense_bytes: int) -> None:
        """The plain path's cohort sums, formed without a per-client change (see vectorized.py)."""
        for name, value in summed.items():
            sums.update[name] += value
        sums.bytes_up += clients * dense_bytes

    def upload_bytes(self, deltas: dict, c: int) -> int:
        """Bytes client c sends: ring elements (8 bytes) under secure aggregation; with sparse uploads,
        the item-embedding rows it changed and their ids, instead of the whole table."""
        total = 0
        for name, d in deltas.items():
            size = 8 if self.secure else d.element_size()
            if self.sparse and name == ITEM_ROWS:
                rows = int(d[c].ne(0).any(1).sum())
                total += rows * (d.shape[2] * size + ID_BYTES)
            else:
                total += d[c].numel() * size
        return total


class Accountant:
    """User-level (epsilon, delta) of DP-FedAvg after a number of rounds, from Google's dp-accounting.

    Each round samples a fixed number m of the n clients without replacement (the server's
    `Server.sample`), so the event is `SampledWithoutReplacementDpEvent`, whose RDP bound
    (Wang, Balle, Kasiviswanathan, AISTATS 2019) holds for "replace one user" neighbours. Replacing
    one clipped update moves the sum by up to 2 * clip_norm, so the Gaussian's multiplier relative to
    that sensitivity is noise_multiplier / 2. Poisson accounting with q = m / n would not describe
    this sampling. The count of rounds is all the state there is, so a resumed run reports the same
    epsilon as an uninterrupted one."""

    def __init__(self, fed: dict, users: int, per_round: int):
        self.users, self.per_round = users, per_round
        self.noise_multiplier = fed["dp"]["noise_multiplier"]
        self.delta = fed["dp"]["delta"] if fed["dp"]["delta"] is not None else 1.0 / users

    def event(self, rounds: int):
        import dp_accounting

        one = dp_accounting.SampledWithoutReplacementDpEvent(
            self.users, self.per_round, dp_accounting.GaussianDpEvent(self.noise_multiplier / 2))
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    def epsilon(self, rounds: int) -> float | None:
        """None when there is no noise (no guarantee at all)."""
        if self.noise_multiplier == 0:
            return None
        from dp_accounting import NeighboringRelation
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        accountant.compose(self.event(rounds))
        return float(accountant.get_epsilon(self.delta))
