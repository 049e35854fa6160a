"""xling.trainer: hybrid-batch contrastive training and evaluation of multilingual retrievers.

Importing this package is cheap on purpose: its light commands (``xling plan``, ``render``) start without
torch, Ray or DeepSpeed. The spec and the other contracts it shares with the operator are in :mod:`xling.api`.
"""
