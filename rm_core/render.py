"""The one renderer: (principles, prompt, response) -> model input, for serving AND reward-model training.

Layout ("principles first", docs/architecture.md), through the model's own chat template::

    [system]    principle block (+ the prompt's own system message, if any)   <- shared by a whole run
    [user ...]  the prompt (a string, or a list of chat messages)             <- shared by a GRPO group
    [assistant] the response                                                   <- per item

The token ids are the concatenation of three separately tokenized segments (system, prompt,
response). Serving and training both use exactly these ids (training passes them to TRL's
RewardTrainer pre-tokenized), and the two prefixes are what the service's prefix cache reuses.

Principle text and prompts are data: they go through the chat template as message content (Jinja
never evaluates content), and any special-token string inside them (e.g. ``<|im_end|>``) is broken
up so it tokenizes as plain text rather than ending a turn.

Negation: a negated principle contributes its ``negative_definition`` instead of its definition.
A principle WITHOUT a negative definition cannot be negated: asking for it raises
:class:`RenderError` (the service turns it into a 422 naming the principle). We do not synthesise
"do not <definition>" text: small models read such a sentence almost like the positive one, so a
contrast against it would be noise presented as signal. The contrastive scorer reads such a plain
principle against :data:`REFERENCE_INSTRUCTIONS` put in its place instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from threading import Lock

from principles.schema import Principle
from salmon.errors import UserError

PROMPT_FORMAT_VERSION = "salmon-rm-v1"
PRINCIPLE_HEADER = "You are a helpful AI assistant. Your response must follow these principles:"
PROBE_QUESTION = "Does the assistant's last response follow all of the principles above? Answer Yes or No."
ROLES = ("system", "user", "assistant")
# What a plain principle (one with no negative definition) is contrasted with: the same block with it
# replaced by each of these generic instructions in turn. Contrasting with the block without it, or with
# no principles at all, measures mostly that an instruction is there (every instruction favours the same
# terse answers), not what it says; generic instructions in its place cancel that part.
REFERENCE_INSTRUCTIONS = (
    "Answer the user's question.",
    "Write a helpful response.",
    "Respond to the user's message.",
    "Give a clear answer.",
)

Message = dict[str, str]
Prompt = str | Sequence[Message]


class RenderError(UserError):
    """Input that cannot be rendered; the message says what to fix."""


def principle_block(principles: Sequence[Principle], negated: Collection[str] = ()) -> str:
    """The system text for a list of principles, with the named ones negated."""
    if not principles:
        raise RenderError("at least one principle is needed to render a reward-model input")
    known = {p.name for p in principles}
    unknown = [n for n in negated if n not in known]
    if unknown:
        raise RenderError(f"negate names {unknown} that are not in the principle list {sorted(known)}")
    lines = [PRINCIPLE_HEADER]
    for p in principles:
        if p.name in negated:
            if not p.negative_definition:
                raise RenderError(
                    f"principle {p.name!r} has no negative_definition, so it cannot be negated; "
                    "add one or leave it out of 'negate'"
                )
            lines.append(f"- {p.negative_definition}")
        else:
            lines.append(f"- {p.definition}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RenderedInput:
    """Token ids of one (principles, prompt, response) input, in its three segments."""

    system_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    truncated: bool = False

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        return self.system_ids + self.prompt_ids

    @property
    def input_ids(self) -> list[int]:
        return list(self.system_ids + self.prompt_ids + self.response_ids)

    def __len__(self) -> int:
        return len(self.system_ids) + len(self.prompt_ids) + len(self.response_ids)


def normalize_prompt(prompt: Prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    msgs = []
    for i, m in enumerate(prompt):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RenderError(f"prompt message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise RenderError(f"prompt message {i}: content must be a string")
        msgs.append({"role": role, "content": content})
    if not msgs:
        raise RenderError("prompt is an empty message list; give a string or at least one message")
    return msgs


def special_token_strings(tokenizer) -> list[str]:
    """The tokenizer's special-token strings, longest first (a longer one is defused before its prefix)."""
    return sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)


def defuse(text: str, specials: Sequence[str]) -> str:
    """``text`` with every special-token string of ``specials`` broken up (see the module docstring)."""
    for tok in specials:
        if tok in text:
            # A zero-width space after the first character keeps the text readable but no
            # longer matches the special token, so user data cannot close a chat turn.
            text = text.replace(tok, tok[0] + "\u200b" + tok[1:])
    return text


class Renderer:
    """Renders and tokenizes reward-model inputs for one tokenizer.

    ``max_prompt_tokens`` bounds the prompt segment (over-long prompts lose tokens from the start
    when ``truncate`` is true, else :class:`RenderError`); ``max_response_tokens`` bounds the
    response (never truncated: scoring half a response would be a wrong score).
    """

    def __init__(self, tokenizer, max_prompt_tokens: int = 1024, max_response_tokens: int = 1024,
                 system_cache_size: int = 256):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self._specials = special_token_strings(tokenizer)
        self._system_cache: OrderedDict[str, tuple[str, tuple[int, ...]]] = OrderedDict()
        self._system_cache_size = system_cache_size
        self._lock = Lock()
        self._check_template()

    # -- text ---------------------------------------------------------------------------------
    def _template(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _check_template(self) -> None:
        sys_m = {"role": "system", "content": "S"}
        user_m = {"role": "user", "content": "U"}
        asst_m = {"role": "assistant", "content": "A"}
        a = self._template([sys_m])
        b = self._template([sys_m, user_m], add_generation_prompt=True)
        c = self._template([sys_m, user_m, asst_m])
        if not (b.startswith(a) and c.startswith(b)):
            raise RenderError(
                "this model's chat template does not render conversations as prefixes of longer ones; "
                "salmon needs (system) ⊂ (system, prompt) ⊂ (system, prompt, response)"
            )

    def _split(self, system_text: str, prompt: Prompt, response: str, tail: list[Message] | None = None,
               ) -> tuple[str, str, str]:
        msgs = [dict(m, content=defuse(m["content"], self._specials)) for m in normalize_prompt(prompt)]
        system = defuse(system_text, self._specials)
        if msgs[0]["role"] == "system":  # the prompt's own system message follows the principles
            system = f"{system}\n\n{msgs.pop(0)['content']}"
        if any(m["role"] == "system" for m in msgs):
            raise RenderError("only the first prompt message may have role 'system'")
        if not msgs or msgs[-1]["role"] != "user":
            raise RenderError("the prompt must end with a user message (the response answers it)")
        sys_m = {"role": "system", "content": system}
        s = self._template([sys_m])
        p = self._template([sys_m, *msgs], add_generation_prompt=True)
        full_msgs = [sys_m, *msgs, {"role": "assistant", "content": defuse(response, self._specials)}]
        if tail:
            full = self._template(full_msgs + tail, add_generation_prompt=True)
        else:
            full = self._template(full_msgs)
        return s, p[len(s):], full[len(p):]

    # -- parsing chat-templated text (OpenRLHF's /get_reward sends full strings) ---------------
    def _markers(self) -> tuple[str, str]:
        """(assistant opener, turn closer) of this template, found by rendering sentinels."""
        u, a = "\x00U\x00", "\x00A\x00"
        bare = self._template([{"role": "user", "content": u}])
        gen = self._template([{"role": "user", "content": u}], add_generation_prompt=True)[len(bare):]
        closed = self._template([{"role": "user", "content": u}, {"role": "assistant", "content": a}])
        return gen, closed[closed.index(a) + len(a):]

    def parse_conversation(self, text: str) -> tuple[list[Message], str]:
        """Split a chat-templated prompt+response string into (prompt messages, response).

        Turns are recognised by the template's own role openers (``<opener-of-role>content<closer>``),
        so this works for ChatML- and Llama-3-style templates. Raises RenderError when the text does
        not follow this model's template.
        """
        gen, close = self._markers()
        if "assistant" not in gen or not close.strip():
            raise RenderError("this model's chat template cannot be parsed; send 'prompts' with each query")
        openers = {role: gen.replace("assistant", role) for role in ROLES}
        cut = text.rfind(gen)
        if cut < 0:
            raise RenderError(
                f"query has no assistant turn ({gen.strip()!r}); send the chat-templated prompt + response")
        head, response = text[:cut], text[cut + len(gen):]
        if response.endswith(close):
            response = response[: -len(close)]
        elif response.endswith(close.rstrip()):
            response = response[: -len(close.rstrip())]
        msgs: list[Message] = []
        pos = 0
        bos = self.tokenizer.bos_token or ""
        while pos < len(head):
            if head[pos:].strip() == "" or (bos and head[pos:] == bos):
                break
            for role, opener in openers.items():
                o = opener.lstrip() if pos == 0 and not head.startswith(opener) else opener
                if head.startswith(o, pos):
                    end = head.find(close, pos + len(o))
                    if end < 0:
                        raise RenderError(f"query: a {role} turn is not closed with {close.strip()!r}")
                    msgs.append({"role": role, "content": head[pos + len(o):end]})
                    pos = end + len(close)
                    break
            else:
                if bos and head.startswith(bos, pos):
                    pos += len(bos)
                    continue
                raise RenderError("query does not follow this model's chat template; send 'prompts' too")
        if msgs and msgs[0]["role"] == "system" and msgs[0]["content"] == self._default_system():
            msgs.pop(0)  # the template's own default system turn, not the client's content
        if not msgs:
            raise RenderError("query has no prompt turns before the assistant turn")
        return msgs, response

    def _default_system(self) -> str | None:
        """The system text a template inserts when a conversation has none (SmolLM's does)."""
        u = "\x00U\x00"
        text = self._template([{"role": "user", "content": u}])
        gen, close = self._markers()
        opener = gen.replace("assistant", "system")
        start = text.find(opener)
        if start < 0 or start > text.find(u):
            return None
        end = text.find(close, start)
        return text[start + len(opener):end] if end > 0 else None

    # -- tokens -------------------------------------------------------------------------------
    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _system_ids(self, system_str: str) -> tuple[int, ...]:
        with self._lock:
            hit = self._system_cache.get(system_str)
            if hit is not None:
                self._system_cache.move_to_end(system_str)
                return hit[1]
        ids = self._encode(system_str)
        with self._lock:
            self._system_cache[system_str] = (system_str, ids)
            while len(self._system_cache) > self._system_cache_size:
                self._system_cache.popitem(last=False)
        return ids

    def render(self, system_text: str, prompt: Prompt, response: str, truncate: bool = True,
               probe: bool = False) -> RenderedInput:
        """Token ids for one input. ``probe`` appends the yes/no question (the probe scorer)."""
        tail = [{"role": "user", "content": PROBE_QUESTION}] if probe else None
        s, p, r = self._split(system_text, prompt, response, tail)
        system_ids = self._system_ids(s)
        prompt_ids = self._encode(p)
        response_ids = self._encode(r)
        if len(response_ids) > self.max_response_tokens:
            raise RenderError(
                f"response is {len(response_ids)} tokens; the limit is {self.max_response_tokens} "
                "(responses are never truncated)"
            )
        truncated = False
        if len(prompt_ids) > self.max_prompt_tokens:
            if not truncate:
                raise RenderError(
                    f"prompt is {len(prompt_ids)} tokens; the limit is {self.max_prompt_tokens}. "
                    "Shorten it, or send \"truncate\": true to keep its last tokens"
                )
            prompt_ids = prompt_ids[-self.max_prompt_tokens:]
            truncated = True
        return RenderedInput(system_ids, prompt_ids, response_ids, truncated)

    def render_principles(self, principles: Sequence[Principle], prompt: Prompt, response: str,
                          negated: Collection[str] = (), truncate: bool = True) -> RenderedInput:
        return self.render(principle_block(principles, negated), prompt, response, truncate=truncate)
