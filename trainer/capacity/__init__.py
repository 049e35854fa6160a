"""``xling plan FILE --gpus N --gpu-mem 80``: will this experiment fit, and how long will a step take?

Everything is arithmetic on the model's shape, so it runs before any worker starts and without a GPU:

- the model is instantiated on the ``meta`` device from its Hugging Face config (a local dir or the hub
  cache) or from a built-in table of known shapes, giving exact parameter counts and the largest layer;
- model states per GPU come from DeepSpeed's own estimators (the ones ``estimate_zero3_model_states_mem_
  needs_all_cold`` prints), activations from the transformer's saved tensors per token, plus the
  GradCache buffers, DeepSpeed's communication buckets and a fixed runtime overhead;
- FLOPs per step are 6N per token, 8N with GradCache, +2N with activation checkpointing (N: non-embedding
  parameters); step time is the slowest of those FLOPs at a stated fraction of peak, the host's kernel
  launches (small models are launch-bound) and ZeRO-3's per-module fetches and parameter traffic, plus
  the optimizer step's memory traffic (constants calibrated on issue 26's H200 measurements).

One concern per module: ``shapes`` (parameter counts), ``flops`` (FLOPs, device peaks, MFU: also the
trainer's per-step MFU metric), ``estimate`` (memory and step time at a ZeRO stage), ``table`` (the printed
plan), ``check`` (``check_fits``, which ``xling run`` calls to refuse a run that cannot fit, and ``stage:
auto``) and ``cli`` (``xling plan``).
"""
