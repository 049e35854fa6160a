"""The MLflow tags of xling's runs, named once for the side that writes them and the side that reads them.

A sweep is one parent run (``ROLE`` = ``ROLE_SWEEP``) and one nested child run per trial (``ROLE_TRIAL``,
linked by MLflow's ``PARENT_RUN_ID``). The trainer's sweep driver (:mod:`xling.trainer.sweep.tune`) finds
runs again by these tags when a sweep continues, and the report (:mod:`xling.trainer.sweep.summary`)
rebuilds every trial's point and seed from them, so both sides must spell them alike. Single runs carry the run-wide tags too.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- every run

#: MLflow's own tag of a nested run: its parent's run id.
PARENT_RUN_ID = "mlflow.parentRunId"
#: Experiment tag telling MLflow's UI that an experiment holds training runs (it shows the runs table).
EXPERIMENT_KIND = "mlflow.experimentKind"
#: ``running`` while a run trains, then its end state in lower case (``finished``, ``stopped``, ...).
STATUS = "xling.status"
#: The Kubernetes uid of the RetrievalExperiment a run belongs to (the operator finds its runs by it).
K8S_UID = "xling.k8s.uid"
MODEL = "xling.model"
SAMPLING = "xling.sampling"
ALPHA = "xling.alpha"
DATA_FINGERPRINT = "xling.data_fingerprint"
GIT_COMMIT = "xling.git_commit"
BAD_ROWS_SKIPPED = "xling.bad_rows_skipped"
#: Key of the mined hard negatives a run trained with.
MINED_NEGATIVES = "xling.mined_negatives"
#: ``evaluated`` once ``xling results --full-pool`` logged the run's (or zero-shot's) full-pool numbers.
FULL_POOL = "xling.full_pool"
#: On a failed run: why, in one line naming the spec field to change where one is to blame.
FAILURE = "xling.failure"
#: MLflow's own tag for a run's description (Markdown, shown at the top of the run page).
DESCRIPTION = "mlflow.note.content"
#: On a registered model version: the run it was logged by.
RUN_ID = "xling.run_id"

# ----------------------------------------------------------------------------- sweeps

#: What a run is in a sweep: ``ROLE_SWEEP`` (the parent) or ``ROLE_TRIAL`` (a child).
ROLE = "xling.role"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
#: The sweep's ``metadata.name``, on the parent and (through the shared tags) every trial.
SWEEP = "xling.sweep"
#: On the parent: digest of the plan it was started from (a continued sweep must match it).
PLAN_DIGEST = "xling.plan_digest"
#: On the parent: trials planned, then ``finished/planned`` once summarized, and the best point's label.
TRIALS = "xling.trials"
TRIALS_FINISHED = "xling.trials_finished"
BEST_POINT = "xling.best_point"
#: On a trial: its stable name (``p0-s1``), point index, point label, point values (JSON) and seed.
TRIAL = "xling.trial"
POINT = "xling.point"
POINT_LABEL = "xling.point_label"
POINT_VALUES = "xling.point_values"
SEED = "xling.seed"
#: On the model version ``sweep.registerBest`` registers: the sweep's parent run.
SWEEP_RUN_ID = "xling.sweep_run_id"


def tag_is(tag: str, value: str) -> str:
    """MLflow search filter: runs whose ``tag`` equals ``value``."""
    return f"tags.`{tag}` = '{value}'"


def children_of(parent_run_id: str) -> str:
    """MLflow search filter for the nested runs of a parent."""
    return tag_is(PARENT_RUN_ID, parent_run_id)


def parents_of_sweep(sweep: str) -> str:
    """MLflow search filter for the parent runs of the sweep named ``sweep`` (each fresh start adds one)."""
    return f"{tag_is(SWEEP, sweep)} and {tag_is(ROLE, ROLE_SWEEP)}"
