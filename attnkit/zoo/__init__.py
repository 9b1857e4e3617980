"""attnkit.zoo: trained token mixers of the seed papers, a tiny LM to hold them and the MQAR task.

Every mixer maps (B, T, d) -> (B, T, d) causally, has a decode path (``init_state`` / ``step``) and counts its
decode state (``state_size``); see :mod:`attnkit.zoo.base`. Mixers are registered by name as lazy
``"module:Class"`` entries, imported on first use::

    from attnkit.zoo import TinyLM, LMConfig, build_mixer, mqar
    mixer = build_mixer("based", 64, feature_dim=16)
    lm = TinyLM(LMConfig(vocab_size=256, d_model=64, mixers=["base_conv", "based"]))
"""

from __future__ import annotations

from attnkit.zoo.base import Mixer
from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar, mqar_accuracy
from attnkit.zoo.registry import build_mixer, mixer_class, mixers, register

__all__ = ["LMConfig", "Mixer", "TinyLM", "build_mixer", "mixer_class", "mixers", "mqar", "mqar_accuracy", "register"]
