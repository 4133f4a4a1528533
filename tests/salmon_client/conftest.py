"""One real `salmon serve` child process for the integration suites (client, verl, OpenRLHF, TRL, vLLM).

The zero-shot contrastive scorer on the tiny random-init model with the real tokenizer: its chat
template lets /get_reward, /classify and /pooling split whole texts into turns as they do for the
embedded model, and it scores in milliseconds. An API key is set, so every integration is shown
sending it; ``max_items`` is small, so a batch of a few prompts is split into several requests.
"""

from __future__ import annotations

import pytest

from tests.reliability.helpers import ServeProcess

KEY = "integration-key"
MAX_ITEMS = 4


@pytest.fixture(scope="session")
def serve(tmp_path_factory, tiny_model_dir):
    settings = {"scorer": "contrastive", "model": str(tiny_model_dir), "default_principle_set": "concise",
                "watch_registry": False, "max_items": MAX_ITEMS, "max_prompt_tokens": 256}
    with ServeProcess(tmp_path_factory.mktemp("serve"), settings, env={"SALMON_API_KEY": KEY}) as srv:
        yield srv


@pytest.fixture
def env(serve, monkeypatch):
    """The environment a user sets: the service's URL and key (nothing else names them)."""
    monkeypatch.setenv("SALMON_URL", serve.url)
    monkeypatch.setenv("SALMON_API_KEY", KEY)
    monkeypatch.delenv("SALMON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("SALMON_PRINCIPLE_SET", raising=False)
    return serve


@pytest.fixture(scope="session")
def chat(tiny_model_dir):
    """(prompt, response) -> the text a policy with the embedded chat template generates."""
    from salmon.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)

    def render(prompt: str, response: str | None = None) -> str:
        msgs = [{"role": "user", "content": prompt}]
        if response is None:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok.apply_chat_template([*msgs, {"role": "assistant", "content": response}], tokenize=False)

    return render
