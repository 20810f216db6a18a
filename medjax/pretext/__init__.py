"""Self-supervised pretraining (issue 21): pretext tasks that train an encoder through the ordinary run.

Modules: `tasks` (`config.pretext` -> model wrapper, objective, evaluator), `models` (the wrappers: contrastive
SimCLR / BYOL / MoCo v3, rotation prediction, Models Genesis restoration, masked image modelling; the encoder
is always the `encoder` subtree), `corruptions` (Models Genesis corruptions, rotations), `masking` (N-D patches
and random patch masks).
"""

from medjax.pretext import corruptions, masking, models, tasks
from medjax.pretext.models import ENCODER, encoder_variables

__all__ = ["ENCODER", "corruptions", "encoder_variables", "masking", "models", "tasks"]
