"""xling.trainer: hybrid-batch contrastive training and evaluation of multilingual retrievers.

Importing this package is cheap on purpose: the spec (``xling.trainer.spec``) is shared with the
operator, which must never import torch, ray or deepspeed.
"""
