"""Synthetic principle preferences and principle-following reward-model training (SALMON's pipeline).

Stages, each a ``salmon synth …`` command and a function: prompts (load / TGRT generation) ->
:func:`~data_synth.sample.run_sample` -> :func:`~data_synth.judge.run_judge` ->
:func:`~data_synth.aggregate.run_aggregate` -> :func:`~data_synth.rm_train.train_reward_model`
(publishes a registry version), and :mod:`data_synth.watch`, the on-policy loop over RL rollouts.
"""
