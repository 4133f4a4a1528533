"""`salmon bench`: the scoring fast path against its limit, the no-cache path and a serve_rm-style baseline.

Modules: :mod:`benchmarks.workload` (the workload below), :mod:`benchmarks.baselines` (configurations
(1) and (4)'s model side), :mod:`benchmarks.runner` (one subprocess per configuration, the HTTP
client, the timing), :mod:`benchmarks.report` (FLOP counts, the summary, BENCHMARKS.md) and
:mod:`benchmarks.cli` (``main(argv)``, what ``salmon bench`` runs), :mod:`benchmarks.sweep`
(``--sweep``: the trained scorer over group sizes and principle-block lengths, a table and a PNG).

Workload (GRPO-shaped, seeded): B prompts × G responses per round, R rounds, one principle set for the
whole run. A trainer sends one request per prompt group (G items sharing a prompt), the B requests of
a round concurrently, and waits for the round before the next (a training step). Every round has new
prompts; the principle block is the same throughout, so cross-request reuse of its key/value cache
shows. Each configuration is warmed up once, not timed, with one request of the same shape and another
prompt (it also puts the principle block in the service's cache, as in a long run).

- Principle set: shipped principles (rm, then self_align, harmless, honest, rl, ...) taken in order
  until the system segment (the principle block through the chat template) reaches
  ``--prefix-tokens``; synthetic numbered principles only if the shipped ones run out.
- Prompts: data_synth/data/prompts.jsonl, shuffled with the seed (synthetic ones if it is missing).
- Responses: sentences from a fixed pool, cut to a seeded length in
  [--min-response-tokens, --max-response-tokens] tokens.
- Scorer: the contrastive scorer (``--contrast whole_set`` by default: 2 sequences per item, the set
  and the set negated; ``per_principle`` is k+1 sequences per item and k+1 principle blocks), or with
  ``--scorer trained`` the trained reward model users are served after training: a registry version
  (``--registry DIR``, ``--version``) or by default the shipped RM (rm_core/shipped), one sequence per
  item, its value the score head at the last token, on its manifest's base model. The probe scorer
  does not take the prefix-cache path, so there is nothing to compare there.

Configurations, each in its own subprocess (same start conditions; per-configuration peak RSS):

1. ``limit``: the same scorer sequences run directly on the model, no HTTP, no queue, no cache
   bookkeeping: each unique principle block once (during warm-up, as the service's warm cache), each
   (block, prompt) prefix once, then all responses of that prefix as one batch of suffixes against
   its key/value cache (split by the same ``max_batch_tokens``), through the scorer's own prefix and
   suffix forwards (the service's code, without its cache bookkeeping). Rendering is not timed. This
   is the floor for the work the service must do.
2. ``service``: this service end to end over HTTP on loopback (uvicorn, /v1/score), prefix cache on.
3. ``service_no_cache``: the same with ``prefix_cache=False`` (every sequence in full).
4. ``baseline``: a small stand-in written here with the design of OpenRLHF's ``serve_rm``, NOT
   OpenRLHF itself: FastAPI + uvicorn, the model call inside the async handler (blocking the event
   loop, as serve_rm's ``get_reward`` does), one padded forward over the request's full sequences
   (serve_rm's ``batch_size=None``), no cross-request batching, no prefix reuse. It computes the
   scorer's own values (contrastive: lm_head on response positions only; trained: the whole sequence
   classifier over the padded sequences, as serve_rm runs its reward model) and speaks the same
   /v1/score body, so the client side is identical.

Reported: wall time of the R timed rounds, tokens/s (the full-sequence tokens of the workload, the
same numerator for every configuration, so tokens/s ratios are time ratios), per-request p50/p99
latency, peak RSS of the configuration's process (VmHWM), prefix-cache bytes against its bound, the
largest score difference from the limit's values, and the ratios
``service/limit`` (time; target ≤ 1.25, ≤ 1.15 for the trained scorer), ``no_cache/service``
(speed-up; target ≥ 3) and ``baseline/service`` (speed-up; target ≥ 4), each next to its work ratio
(FLOPs counted from the model's shapes; the trained scorer's value head is one output, not the
vocabulary). Printed as a table, written as JSON (``--out``) and
appended as a markdown table to BENCHMARKS.md (``--benchmarks-md``; ``''`` skips) with the machine,
versions, date and load average. A GPU run is ``--device cuda`` (and ``--dtype bfloat16``).
"""
