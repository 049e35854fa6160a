"""xling.api: the contract between the trainer and the operator, which both import.

The experiment spec split by audience (:mod:`.spec`), the defaults both sides agree on (:mod:`.contracts`),
the MLflow tags (:mod:`.tags`), the flat metric names (:mod:`.metrics`), the user-facing errors
(:mod:`.errors`) and every ``XLING_*`` environment variable (:mod:`.env`). Only pydantic, PyYAML and the
standard library are imported here, never torch, Ray or DeepSpeed (a test imports every module and checks),
and nothing from ``xling.trainer`` or ``xling.operator``: the operator image installs no training stack.
"""
