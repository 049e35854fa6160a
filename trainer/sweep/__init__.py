"""Sweeps: the trials a sweep plans, the Ray Tune driver that runs them, and the summary built from MLflow."""
