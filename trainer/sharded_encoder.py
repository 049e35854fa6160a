"""A TextEncoder whose batches are spread over Ray actors: mining encodes a corpus on every GPU of a cluster.

Each actor holds one copy of the encoder (on its own GPU when the run trains on GPUs). The texts are sorted
by length and cut into batches exactly as :class:`~xling.trainer.model.HFTextEncoder` cuts them, and actor
``w`` encodes batches ``w, w + W, …``: every batch holds the same texts as in one process, so the embeddings
are the same, and the evaluation's cache (``encode_cached``) and fingerprint work unchanged over it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import ray

from xling.api.errors import InputError
from xling.api.spec.training import ModelSpec
from xling.trainer.data.store import DataLocation
from xling.trainer.evaluation.protocol import Kind
from xling.trainer.job import local_model_path


@ray.remote
class _Shard:
    """One worker's encoder (torch is imported in the actor, not in the driver)."""

    def __init__(
        self, path: str, model_spec: ModelSpec, batch_size: int, staged: DataLocation | None
    ) -> None:
        from xling.trainer.model import encoder_for

        self.encoder = encoder_for(local_model_path(path, staged), model_spec, batch_size)

    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def encode(self, texts: list[str], kind: Kind) -> np.ndarray:
        return self.encoder.encode(texts, kind)


class ShardedEncoder:
    """``encoder_for(path, model_spec, batch_size)`` on ``workers`` Ray actors, one GPU each with ``gpus`` (as the
    run's workers train), else one CPU each; needs a started Ray. With ``staged`` (``model.stage_model``) the
    actors load their node's copy of it, not ``path`` on the driver's disk."""

    def __init__(
        self, path: str, model_spec: ModelSpec, batch_size: int, workers: int, gpus: bool,
        staged: DataLocation | None = None,
    ) -> None:  # fmt: skip
        unit = "GPU" if gpus else "CPU"
        room = int(ray.cluster_resources().get(unit, 0))
        # A local Ray has all it will ever have: actors beyond it would wait forever. A cluster's nodes may
        # still be joining (RAY_ADDRESS: a RayJob's driver), so there Ray waits for them, as training does.
        if not os.environ.get("RAY_ADDRESS") and workers > room:
            raise InputError(
                None,
                f"{workers} actors, but this Ray has {room} {unit}s",
                field="data.hardNegatives.mine.workers",
            )
        self.batch_size = batch_size
        self.actors = [
            _Shard.options(num_cpus=1, num_gpus=int(gpus)).remote(path, model_spec, batch_size, staged)
            for _ in range(workers)
        ]
        self.fingerprint = ray.get(self.actors[0].fingerprint.remote())

    def encode(self, texts: Sequence[str], kind: Kind) -> np.ndarray:
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        workers = len(self.actors)
        parts = [np.concatenate(own) for w in range(workers) if (own := batches[w::workers])]
        # fewer parts than actors when the texts fill fewer batches: the last actors stay idle
        futures = [
            self.actors[w].encode.remote([texts[i] for i in part], kind) for w, part in enumerate(parts)
        ]
        embedded = ray.get(futures)
        out = np.zeros((len(texts), embedded[0].shape[1] if embedded else 0), dtype=np.float32)
        for part, emb in zip(parts, embedded, strict=True):
            out[part] = emb
        return out

    def close(self) -> None:
        """Free the actors' GPUs for training."""
        for actor in self.actors:
            ray.kill(actor)
