"""Compression and deployment (issue 23): pruning masks, quantization, distillation and the exported predictor.

Parts the one training loop is given (DESIGN.md): a pruning mask is an optax transformation, quantization-aware
training a model wrapper, distillation an objective holding the teacher's variables; export serialises a
predict function with `jax.export`. Modules are imported by their users (`from medjax.compress import pruning`).
"""
