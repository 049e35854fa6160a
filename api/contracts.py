"""Defaults that separate parts of xling must agree on, kept in one place: the cache directories and the
default MLflow tracking URI.

The trainer, its workers, ``xling eval`` and the spec's documentation share one cache directory. (The
operator sets the experiment's uid in the pods' environment, :data:`xling.api.env.EXPERIMENT_UID_ENV`, the
trainer tags its MLflow runs with it and the operator finds the runs by that tag, named in
:mod:`xling.api.tags`.) Standard library only: the operator (no torch, no Ray) imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from xling.api.env import CACHE_ENV


def default_cache_dir() -> Path:
    """``$XLING_CACHE``; else ``.cache`` in the source checkout when working inside it (``make demo`` keeps
    its converted model there); else the user's cache directory, ``$XDG_CACHE_HOME/xling`` or
    ``~/.cache/xling``: a source tree one only imports xling from is not written to."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and Path.cwd().resolve().is_relative_to(repo):
        return repo / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xling"


#: Where runs are tracked when neither ``--tracking-uri``, ``spec.tracking.trackingUri`` nor
#: ``$MLFLOW_TRACKING_URI`` says (a SQLite file in the working directory); the help texts and the spec's field
#: description quote it.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

#: The default cache directory in words, for the spec's field description and ``--help``.
CACHE_DEFAULT = "$XLING_CACHE, else .cache in the source checkout when run inside it, else ~/.cache/xling"
#: The default of :func:`embedding_cache_dir` in words.
EMBEDDING_CACHE_DEFAULT = f"embeddings in the cache directory ({CACHE_DEFAULT})"


def prepared_cache_dir() -> Path:
    """The node-local copies of prepared corpora held in a bucket (a memory map needs a local file): the
    driver fills it, every worker of the node reads it."""
    return default_cache_dir() / "prepared"


def staged_model_cache_dir() -> Path:
    """The node-local copies of models staged in a bucket (``model.stage_model``): every worker of a node
    loads the one copy."""
    return default_cache_dir() / "staged-models"


def embedding_cache_dir(configured: str | Path | None = None) -> Path:
    """The embedding cache: ``configured`` (evaluation.cacheDir, ``xling eval --cache-dir``) when given, else
    ``embeddings`` in :func:`default_cache_dir`, the one default of runs, mining and ``xling eval``."""
    return Path(configured) if configured else default_cache_dir() / "embeddings"
