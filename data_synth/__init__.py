"""Synthetic principle preferences and principle-following reward-model training (SALMON's pipeline).

The stages, their order and what each reads and writes are declared once, in
:data:`data_synth.stages.STAGES`; each is also a ``salmon synth …`` command (training:
``salmon rm-train``, which publishes a registry version). :mod:`data_synth.pipeline` runs them all,
and :mod:`data_synth.watch`, the on-policy loop over RL rollouts, runs the ones after ``judge``.
"""
