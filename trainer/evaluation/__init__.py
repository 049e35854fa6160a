"""Multilingual retrieval evaluation: XQuAD-R / MLQA-R (mono, cross, multi, language bias) and MIRACL.

Import the submodules themselves (``api``: ``load_suite``, ``evaluate_suite``, ``evaluate_with_centering``;
``report``: ``format_table``, ``log_to_mlflow``; ``cli``: ``xling eval``). The package re-exports nothing, so
importing one light submodule (``protocol``, ``errors``) does not load numpy, FAISS or matplotlib, and every
caller's import names the module it uses (docs/architecture.md's map draws it).
"""
