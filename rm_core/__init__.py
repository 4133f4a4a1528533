"""The reward-model core, with no HTTP in it: the renderer, the scorers, the prefix cache, the version
registry and the principle-flip check set. The service (rm_service), the synthetic-preference jobs
(data_synth) and the RL trainer (policy_trainer) all import it; it imports none of them."""
