"""RAIN (rewindable auto-regressive inference): generation that searches over token segments, with the
reward scorer's value of each partial response under the request's principles as its guide. No
training: the same causal LM samples candidates, the scorer judges them, and the search keeps only
what it is confident in.

The search, in our words:

- The **root** is the committed prefix (the response so far). A node below it is one more sampled
  segment of tokens; its *value* is the scorer's value of (committed + path + segment) as a response
  to the prompt under the principles (with ``value_per_token``: divided by its token count, because a
  summed log-probability contrast grows with length and partial responses of different lengths meet
  in one tree).
- Each **iteration** starts at the root and descends by **PUCT**: the child maximising
  ``Q(c) + c_puct * P(c) * sqrt(N(parent)) / (1 + N(c))``, where Q is the mean value of the
  evaluations under c, N its visit count and P its prior (softmax over siblings of the segment's mean
  token log-probability under the model). At the leaf it **expands**: ``candidates`` segments of the
  current segment length are sampled after the leaf, each is valued, and every node on the path
  gains their visits and values (so a node's Q is the mean over its whole subtree).
- **Commit**: when the root's most visited child has at least ``commit_visits`` visits and its Q is
  not below the committed prefix's own value by more than ``value_margin``, its segment is final:
  it is emitted (``on_commit``), becomes the new root and keeps its subtree. When that child held at
  least ``confident_share`` of the visits, the tree was confident and the segment length grows
  (``segment_growth``, up to ``max_segment_tokens``).
- **Rewind**: when ``rewind_after`` iterations pass without a child to commit (every branch's value
  fell below the committed prefix's), the speculative tree is thrown away and the search starts again
  from the committed prefix with the shortest segment length. After ``max_rewinds_per_step`` rewinds
  at one position the best child by Q is committed anyway (``forced_commits``).
- **Budgets**: never more than ``max_new_tokens`` committed tokens (segments are cut to what is left);
  at most ``max_expansions`` iterations; a wall-time deadline ``time_budget_s`` checked before every
  iteration (so it is overshot by at most one iteration). When the iterations run out or the
  deadline passes, the most visited path is committed; after the iterations (not the deadline), with
  ``finish: sample``, the rest is sampled plainly within the token budget.

Plain sampling (:func:`plain_generate`) is the same interface without search: one sample of
``max_new_tokens``. Nothing here knows HTTP: the service passes a value function that goes through
its batcher, the CLI one that calls the scorer directly (:func:`scorer_value_fn`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from principles.schema import Principle
from rm_core.render import Prompt, Renderer, normalize_prompt, principle_block
from salmon.modeling import kv_cache_kwargs, returned_kv_cache

Search = Literal["rain", "none"]
ValueFn = Callable[[Sequence[str]], Sequence[float]]
"Values of response texts (the scorer's, under the request's principles), one per text, in order."


class RainConfig(BaseModel):
    """The search's knobs; the defaults run a short answer on a laptop CPU in tens of seconds."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=48, ge=1, le=4096, description="Committed tokens at most.")
    max_expansions: int = Field(default=32, ge=1, description="Search iterations at most (each expands a leaf).")
    time_budget_s: float = Field(default=60.0, gt=0, description="Wall-time deadline of the whole generation.")
    candidates: int = Field(default=3, ge=1, le=16, description="Segments sampled per expansion.")
    min_segment_tokens: int = Field(default=4, ge=1, description="Segment length at the start and after a rewind.")
    max_segment_tokens: int = Field(default=16, ge=1)
    segment_growth: float = Field(default=2.0, ge=1.0, le=8.0, description="Segment length factor after a confident commit.")
    c_puct: float = Field(default=1.0, ge=0, le=100.0, description="Weight of the prior/exploration term in PUCT.")
    commit_visits: int = Field(default=4, ge=1, description="Visits the root's best child needs to be committed.")
    confident_share: float = Field(default=0.6, gt=0, le=1,
                                   description="Share of the root's visits its committed child held for the segment length to grow.")
    value_margin: float = Field(default=0.0, ge=0,
                                description="How far below the committed prefix's value a child's Q may be and still commit.")
    rewind_after: int = Field(default=4, ge=1, description="Iterations without a committable child before a rewind.")
    max_rewinds_per_step: int = Field(default=1, ge=0, description="Rewinds at one position before a forced commit.")
    temperature: float = Field(default=0.8, ge=0.05, le=10.0, description="Below 0.05 the softmax overflows.")
    top_p: float = Field(default=0.95, gt=0, le=1)
    value_per_token: bool = Field(default=True, description="Divide a response's value by its token count.")
    principles_in_context: bool = Field(
        default=True, description="Generate with the principle block as the system turn (plain sampling too), "
        "so RAIN and plain sampling see the same instructions and differ only by the search.")
    finish: Literal["sample", "stop"] = Field(
        default="sample", description="When the iterations run out: sample the rest plainly, or stop there.")
    seed: int = 0

    @model_validator(mode="after")
    def _segments(self) -> RainConfig:
        if self.min_segment_tokens > self.max_segment_tokens:
            raise ValueError("min_segment_tokens must not exceed max_segment_tokens")
        return self


class Segment(NamedTuple):
    """One sampled continuation: its tokens (no stop token), their log-probability under the model
    (the stop token's included), and whether it ended the response."""

    tokens: tuple[int, ...]
    logprob: float
    ended: bool


class Sampler(Protocol):
    def sample(self, context: Sequence[int], n: int, max_tokens: int, seed: int, temperature: float,
               top_p: float) -> list[Segment]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


@dataclass
class RainStats:
    search: str = "rain"
    expansions: int = 0  # leaves expanded
    iterations: int = 0  # search iterations (expansions and revisits of finished leaves)
    rewinds: int = 0
    commits: int = 0
    forced_commits: int = 0
    value_evaluations: int = 0  # responses valued by the scorer
    tokens_sampled: int = 0
    tokens_committed: int = 0
    max_segment_tokens_used: int = 0
    wall_s: float = 0.0
    stopped: str = ""  # eos | max_new_tokens | max_expansions | deadline | cancelled
    final_value: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    tokens: tuple[int, ...]
    segments: list[str]
    stats: RainStats


@dataclass(eq=False)
class Node:
    """A node of the search tree: ``response`` is the whole response up to and including its segment."""

    response: tuple[int, ...]
    ended: bool = False
    prior: float = 1.0
    value: float = 0.0  # its own evaluation
    visits: int = 0
    total: float = 0.0  # sum of the evaluations in its subtree
    children: list[Node] = field(default_factory=list)
    segment: tuple[int, ...] = ()

    @property
    def q(self) -> float:
        return self.total / self.visits if self.visits else self.value


def puct(child: Node, parent_visits: int, c_puct: float) -> float:
    return child.q + c_puct * child.prior * math.sqrt(parent_visits) / (1 + child.visits)


def select_child(node: Node, c_puct: float) -> Node:
    """The child PUCT prefers (the first of equals, i.e. in sampling order)."""
    n = sum(c.visits for c in node.children)
    return max(node.children, key=lambda c: puct(c, n, c_puct))


def priors(segments: Sequence[Segment]) -> list[float]:
    """Softmax over siblings of each segment's mean token log-probability (stop token counted)."""
    means = [s.logprob / max(1, len(s.tokens) + s.ended) for s in segments]
    top = max(means)
    w = [math.exp(m - top) for m in means]
    z = sum(w)
    return [x / z for x in w]


class TextStream:
    """Committed tokens -> text deltas; a trailing incomplete UTF-8 character waits for the next commit."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.sent = ""

    def delta(self, tokens: Sequence[int], final: bool = False) -> str:
        text = self.decode(tokens)
        if not final:
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):  # a re-merged character: send what differs from here on
            common = 0
            while common < min(len(text), len(self.sent)) and text[common] == self.sent[common]:
                common += 1
            self.sent = self.sent[:common]
        out = text[len(self.sent):]
        self.sent = text
        return out


class RainSearch:
    """One generation's search state (see the module docstring); :func:`rain_generate` runs it."""

    def __init__(self, sampler: Sampler, value_fn: ValueFn, context: Sequence[int], config: RainConfig,
                 on_commit: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.sampler, self.value_fn, self.context, self.cfg = sampler, value_fn, tuple(context), config
        self.on_commit = on_commit
        self.should_stop = should_stop or (lambda: False)
        self.clock = clock
        self.stats = RainStats()
        self.stream = TextStream(sampler.decode)
        self.segments: list[str] = []
        self.seg_len = config.min_segment_tokens
        self._calls = 0

    # -- pieces ----------------------------------------------------------------------------------
    def values(self, responses: Sequence[tuple[int, ...]]) -> list[float]:
        texts = [self.sampler.decode(r) for r in responses]
        raw = list(self.value_fn(texts))
        self.stats.value_evaluations += len(texts)
        if self.cfg.value_per_token:
            return [v / max(1, len(r)) for v, r in zip(raw, responses, strict=True)]
        return [float(v) for v in raw]

    def sample(self, after: tuple[int, ...], n: int, max_tokens: int) -> list[Segment]:
        self._calls += 1
        seed = self.cfg.seed * 1_000_003 + self._calls  # each call its own stream, the same on a rerun
        segs = self.sampler.sample(self.context + after, n, max_tokens, seed, self.cfg.temperature, self.cfg.top_p)
        segs = [Segment(tuple(s.tokens[:max_tokens]), s.logprob, s.ended) for s in segs]  # a sampler may not overrun
        self.stats.tokens_sampled += sum(len(s.tokens) for s in segs)
        self.stats.max_segment_tokens_used = max(self.stats.max_segment_tokens_used, max_tokens)
        return segs

    def terminal(self, node: Node) -> bool:
        return node.ended or len(node.response) >= self.cfg.max_new_tokens

    def expand(self, leaf: Node) -> list[Node]:
        room = self.cfg.max_new_tokens - len(leaf.response)
        segs = self.sample(leaf.response, self.cfg.candidates, min(self.seg_len, room))
        unique: dict[tuple[tuple[int, ...], bool], Segment] = {}
        for s in segs:  # identical samples are one child: the tree holds distinct continuations
            unique.setdefault((s.tokens, s.ended), s)
        segs = list(unique.values())
        responses = [leaf.response + s.tokens for s in segs]
        vals = self.values(responses)
        kids = [Node(response=r, ended=s.ended, prior=p, value=v, visits=1, total=v, segment=s.tokens)
                for r, s, p, v in zip(responses, segs, priors(segs), vals, strict=True)]
        leaf.children = kids
        self.stats.expansions += 1
        return kids

    def iterate(self, root: Node) -> None:
        """One iteration: descend by PUCT from the committed root, expand the leaf, back the values up."""
        path = [root]
        node = root
        while node.children:
            node = select_child(node, self.cfg.c_puct)
            path.append(node)
        if self.terminal(node):
            gained = [node.value]  # a finished response: visit it again, nothing to expand
        else:
            gained = [k.value for k in self.expand(node)]
        for n in path:
            n.visits += len(gained)
            n.total += sum(gained)
        self.stats.iterations += 1

    def commit(self, root: Node, child: Node) -> Node:
        shown = self.stream.delta(child.response, final=self.terminal(child))
        self.segments.append(shown)
        self.stats.commits += 1
        self.stats.tokens_committed = len(child.response)
        if self.on_commit is not None and shown:
            self.on_commit(shown)
        return child

    def best_by_visits(self, root: Node) -> Node:
        return max(root.children, key=lambda c: (c.visits, c.q))

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> GenerationResult:
        cfg, st = self.cfg, self.stats
        start = self.clock()
        deadline = start + cfg.time_budget_s
        root = Node(response=())
        root.value = self.values([()])[0]
        tries = rewinds_here = 0
        while True:
            if self.terminal(root):
                st.stopped = "eos" if root.ended else "max_new_tokens"
                break
            if self.should_stop():
                st.stopped = "cancelled"
                break
            if self.clock() >= deadline:
                st.stopped = "deadline"
                root = self.finish(root, deadline)  # the best path so far; no time left to sample more
                break
            if st.iterations >= cfg.max_expansions:
                st.stopped = "max_expansions"
                root = self.finish(root, deadline)
                break
            self.iterate(root)
            tries += 1
            if not root.children:
                continue
            best = self.best_by_visits(root)
            if best.visits >= cfg.commit_visits and best.q >= root.value - cfg.value_margin:
                share = best.visits / max(1, sum(c.visits for c in root.children))
                root = self.commit(root, best)
                if share >= cfg.confident_share:
                    self.seg_len = min(cfg.max_segment_tokens, math.ceil(self.seg_len * cfg.segment_growth))
                tries = rewinds_here = 0
            elif tries >= cfg.rewind_after:
                if rewinds_here < cfg.max_rewinds_per_step:
                    # Every branch fell below the committed prefix: drop them and sample again from it.
                    root.children, root.visits, root.total = [], 0, 0.0
                    self.seg_len = cfg.min_segment_tokens
                    st.rewinds += 1
                    rewinds_here += 1
                else:
                    root = self.commit(root, max(root.children, key=lambda c: c.q))
                    st.forced_commits += 1
                    rewinds_here = 0
                tries = 0
        st.final_value = root.value
        st.wall_s = self.clock() - start
        return GenerationResult(self.sampler.decode(root.response), root.response, self.segments, st)

    def finish(self, root: Node, deadline: float) -> Node:
        """A budget ran out: commit the most visited path, then (``finish: sample``, time left) sample
        the rest plainly within the token budget."""
        while root.children and not self.terminal(root):
            root = self.commit(root, self.best_by_visits(root))
        if self.cfg.finish == "sample" and not self.terminal(root) and self.clock() < deadline \
                and not self.should_stop():
            seg = self.sample(root.response, 1, self.cfg.max_new_tokens - len(root.response))[0]
            rest = root.response + seg.tokens
            child = Node(response=rest, ended=seg.ended, value=self.values([rest])[0], segment=seg.tokens)
            root = self.commit(root, child)
        return root


def rain_generate(sampler: Sampler, value_fn: ValueFn, context: Sequence[int], config: RainConfig | None = None,
                  *, on_commit: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
                  clock: Callable[[], float] = time.monotonic) -> GenerationResult:
    """RAIN over ``sampler`` after the token ids ``context``, valued by ``value_fn`` (module docstring)."""
    return RainSearch(sampler, value_fn, context, config or RainConfig(), on_commit, should_stop, clock).run()


def plain_generate(sampler: Sampler, value_fn: ValueFn | None, context: Sequence[int],
                   config: RainConfig | None = None, *, on_commit: Callable[[str], None] | None = None,
                   clock: Callable[[], float] = time.monotonic) -> GenerationResult:
    """One plain sample of ``max_new_tokens`` (no search); valued once at the end when ``value_fn`` is given."""
    cfg = config or RainConfig()
    t0 = clock()
    seg = sampler.sample(tuple(context), 1, cfg.max_new_tokens, cfg.seed * 1_000_003, cfg.temperature, cfg.top_p)[0]
    tokens = tuple(seg.tokens[:cfg.max_new_tokens])
    text = sampler.decode(tokens)
    st = RainStats(search="none", tokens_sampled=len(tokens), tokens_committed=len(tokens), commits=1,
                   max_segment_tokens_used=cfg.max_new_tokens,
                   stopped="eos" if seg.ended else "max_new_tokens")
    if on_commit is not None and text:
        on_commit(text)
    st.wall_s = clock() - t0  # the sampling alone: the final value is a report, not part of generating
    if value_fn is not None:
        v = float(list(value_fn([text]))[0])
        st.final_value = v / max(1, len(tokens)) if cfg.value_per_token else v
        st.value_evaluations = 1
    return GenerationResult(text, tokens, [text], st)


def generate(search: Search, sampler: Sampler, value_fn: ValueFn, context: Sequence[int],
             config: RainConfig | None = None, *, on_commit: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """``search`` rain: :func:`rain_generate`; none: :func:`plain_generate` (valued at the end)."""
    if search == "rain":
        return rain_generate(sampler, value_fn, context, config, on_commit=on_commit, should_stop=should_stop)
    return plain_generate(sampler, value_fn, context, config, on_commit=on_commit)


# -- the causal LM side -----------------------------------------------------------------------------
class CausalLMSampler:
    """Sampling from a causal LM with its key/value cache: the context runs once, its cache is repeated
    to ``n`` rows, then ``n`` continuations are drawn token by token (temperature, nucleus) with a
    seeded generator. Forwards run in inference mode and change no model state, so they may run beside
    the scorer's forwards on the same weights (the service relies on this; see rm_service/serving.py)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        # The last context's keys/values and next-token logits: a search's calls share the principle block,
        # the prompt and the committed text, so each runs only the tokens after what it shares.
        self._kept: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None
        self._kept_lock = threading.Lock()
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_ids = {int(i) for i in stops if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id}

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    @staticmethod
    def draw(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
            sorted_p = sorted_p * keep
            pick = torch.multinomial(sorted_p, 1, generator=gen)
            return order.gather(-1, pick)[:, 0]
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    def context_state(self, context: tuple[int, ...]):
        """(key/value cache, next-token logits [1, vocab]) after ``context``, reusing the kept prefix."""
        from transformers import DynamicCache

        with self._kept_lock:
            kept = self._kept
        shared = 0
        if kept is not None:
            ids = kept[0]
            while shared < min(len(ids), len(context)) and ids[shared] == context[shared]:
                shared += 1
        if kept is not None and shared == len(context) == len(kept[0]):
            base, logits = kept[1], kept[2]
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in base], config=self.model.config)
            return cache, logits
        shared = min(shared, len(context) - 1)  # at least one token runs: its logits are the next token's
        base = [(k[:, :, :shared], v[:, :, :shared]) for k, v in kept[1]] if kept is not None and shared else None
        cache = DynamicCache(ddp_cache_data=base, config=self.model.config)
        x = torch.tensor([list(context[shared:])], dtype=torch.long, device=self.device)
        pos = torch.arange(shared, len(context), device=self.device)[None]
        out = self.model(input_ids=x, position_ids=pos, use_cache=True, **kv_cache_kwargs(self.model, cache))
        cache = returned_kv_cache(out)
        logits = out.logits[:, -1].float()
        # Clones: the cache grows (and is repeated per row) while sampling; the kept copy must not change.
        state = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        with self._kept_lock:
            self._kept = (tuple(context), state, logits)
        return cache, logits

    @torch.inference_mode()
    def sample(self, context: Sequence[int], n: int, max_tokens: int, seed: int, temperature: float = 0.8,
               top_p: float = 0.95) -> list[Segment]:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2 ** 63))
        cache, logits = self.context_state(tuple(context))
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.expand(n, -1)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprob = [0.0] * n
        ended = [False] * n
        for step in range(max_tokens):
            lp = torch.log_softmax(logits, dim=-1)
            nxt = self.draw(logits, temperature, top_p, gen)
            for i in range(n):
                if ended[i]:
                    continue
                t = int(nxt[i])
                logprob[i] += float(lp[i, t])
                if t in self.stop_ids:
                    ended[i] = True
                else:
                    tokens[i].append(t)
            if all(ended) or step == max_tokens - 1:
                break
            feed = nxt.to(self.device)[:, None]  # finished rows keep running; their outputs are ignored
            out = self.model(input_ids=feed, use_cache=True, **kv_cache_kwargs(self.model, cache))
            cache = returned_kv_cache(out)
            logits = out.logits[:, -1].float()
        return [Segment(tuple(t), lp_, e) for t, lp_, e in zip(tokens, logprob, ended, strict=True)]


def generation_context(renderer: Renderer, principles: Sequence[Principle], prompt: Prompt,
                       negate: Sequence[str] = (), truncate: bool = True, with_principles: bool = True
                       ) -> tuple[int, ...]:
    """The token ids the model generates after: the renderer's principle block (the scorer's own system
    turn) and the prompt up to the assistant opener; without principles, the prompt alone through the
    chat template. Raises RenderError on a prompt that does not render."""
    if with_principles:
        r = renderer.render(principle_block(principles, negate), prompt, "", truncate)
        return r.system_ids + r.prompt_ids
    text = renderer.tokenizer.apply_chat_template(normalize_prompt(prompt), tokenize=False, add_generation_prompt=True)
    ids = tuple(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[-renderer.max_prompt_tokens:] if truncate else ids


def scorer_value_fn(scorer, principles: Sequence[Principle], prompt: Prompt, negate: Sequence[str] = (),
                    truncate: bool = True) -> ValueFn:
    """The scorer's own offline path as the value (what the CLI and the check run use); the service
    sends the same prepared items through its batcher instead."""
    def value(texts: Sequence[str]) -> list[float]:
        return scorer.score_items(list(principles), [(prompt, t) for t in texts], negate, truncate)

    return value


def sampler_for(scorer, model_source: str = "embedded", options=None, max_prompt_tokens: int = 1024,
                max_response_tokens: int = 1024) -> tuple[CausalLMSampler, Renderer]:
    """The sampler and renderer generation uses beside ``scorer``: a causal-LM scorer's own model and
    renderer (one copy of the weights), else a causal LM of the scorer's base model (``model_source``
    for a scorer without one, e.g. the rule scorer), loaded through the one loader."""
    from rm_core.scorers import CausalLMScorer

    if isinstance(scorer, CausalLMScorer):
        return CausalLMSampler(scorer.model, scorer.tokenizer), scorer.renderer
    from salmon.modeling import load_causal_lm, load_tokenizer

    source = scorer.base_model if scorer.base_model not in {"", "none"} else model_source
    tok = load_tokenizer(source)
    return CausalLMSampler(load_causal_lm(source, options), tok), Renderer(tok, max_prompt_tokens, max_response_tokens)
