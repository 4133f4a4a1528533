"""The worker thread: a bounded queue of prepared items, batched by token budget across requests.

The event loop never runs the model. A request's prepared items become one job with a
``concurrent.futures.Future``; the worker takes the oldest job, then keeps adding queued jobs
while the batch stays under ``max_batch_tokens`` (waiting at most ``batch_wait_ms`` for more),
runs every sequence of the batch through its scorer (which sorts by length and splits by the
same budget to limit padding), and resolves each job's future. Jobs keep the scorer object they
were prepared with, so a batch may hold two model versions during a reload: they run separately.
A full queue rejects at submit time (429 + Retry-After), as TEI does, instead of queueing forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from rm_core.scorers import Prepared, combine_values
from rm_service.errors import Overloaded
from rm_service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    scores: list[float]
    tokens: int
    cached_tokens: int


@dataclass
class Job:
    items: list[Prepared]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.items)


class Batcher:
    def __init__(self, max_batch_tokens: int = 4096, max_queue_items: int = 1024, batch_wait_ms: float = 2.0,
                 metrics: Metrics | None = None):
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_items = max_queue_items
        self.batch_wait_s = batch_wait_ms / 1000
        self.metrics = metrics or Metrics()
        self._queue: deque[Job] = deque()
        self._queued_items = 0
        self._cond = threading.Condition()
        self._stop = False
        self._items_per_s = 50.0  # EMA of throughput, for Retry-After
        self._thread = threading.Thread(target=self._run, name="salmon-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then stop."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    def submit(self, items: list[Prepared]) -> Future:
        job = Job(items)
        if not items:
            job.future.set_result(JobResult([], 0, 0))
            return job.future
        with self._cond:
            if self._stop:
                raise Overloaded("the service is shutting down; retry on another replica", retry_after_s=5)
            if self._queued_items + len(items) > self.max_queue_items:
                wait = (self._queued_items + len(items)) / max(self._items_per_s, 1e-3)
                raise Overloaded(
                    f"the scoring queue is full ({self._queued_items} items waiting, limit "
                    f"{self.max_queue_items}); retry after the Retry-After delay", retry_after_s=wait)
            self._queue.append(job)
            self._queued_items += len(items)
            self.metrics.queue_depth.set(self._queued_items)
            self._cond.notify()
        return job.future

    # -- worker -----------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(timeout=0.5)
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            tokens = batch[0].tokens
            deadline = time.monotonic() + self.batch_wait_s
            while tokens < self.max_batch_tokens:
                if not self._queue:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop:
                        break
                    self._cond.wait(timeout=left)
                    continue
                nxt = self._queue[0]
                if tokens + nxt.tokens > self.max_batch_tokens:
                    break
                batch.append(self._queue.popleft())
                tokens += nxt.tokens
            self._queued_items -= sum(len(j.items) for j in batch)
            self.metrics.queue_depth.set(self._queued_items)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._score(batch)

    def _score(self, batch: list[Job]) -> None:
        by_scorer: dict[int, list[Job]] = {}
        for job in batch:
            by_scorer.setdefault(id(job.items[0].scorer), []).append(job)
        for jobs in by_scorer.values():
            scorer = jobs[0].items[0].scorer
            items = [p for j in jobs for p in j.items]
            seqs = [s for p in items for s in p.seqs]
            t0 = time.perf_counter()
            try:
                values, cached = scorer.compute(seqs) if seqs else ([], [])
            except BaseException as e:  # a model failure fails these jobs, never the worker
                log.exception("scoring failed for a batch of %d items", len(items))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            dt = max(time.perf_counter() - t0, 1e-6)
            ntok = sum(len(s) for s in seqs)
            self._items_per_s = 0.8 * self._items_per_s + 0.2 * (len(items) / dt)
            m = self.metrics
            m.batch_items.observe(len(items))
            m.batch_tokens.observe(ntok)
            m.tokens.inc(ntok)
            m.cached_tokens.inc(sum(cached))
            m.tokens_per_second.set(ntok / dt)
            scores = combine_values(items, values)
            item_i = seq_i = 0
            for j in jobs:
                n_items, n_seqs = len(j.items), sum(len(p.seqs) for p in j.items)
                result = JobResult(scores[item_i:item_i + n_items], sum(p.tokens for p in j.items),
                                   sum(cached[seq_i:seq_i + n_seqs]))
                item_i, seq_i = item_i + n_items, seq_i + n_seqs
                if not j.future.done():
                    j.future.set_result(result)
