"""The real embedded model (SmolLM2-135M): the README's example ordering, and a principle flip."""

from __future__ import annotations

import httpx
import pytest

from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread

pytestmark = pytest.mark.slow

RESPECTFUL = {"name": "respectful", "definition": "The response is polite and respectful toward the user.",
              "negative_definition": "The response is rude and insulting toward the user."}
PROMPT = "Can you tell me what time zone Tokyo is in?"
POLITE = "Of course! Tokyo is in Japan Standard Time (UTC+9). Happy to help."
RUDE = "Ugh, google it yourself, idiot. It's UTC+9, obviously."


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServiceSettings(port=0, request_timeout_s=600)) as srv:
        yield srv


def test_readme_example_orders_polite_above_insulting(server):
    body = {"items": [{"prompt": PROMPT, "response": POLITE}, {"prompt": PROMPT, "response": RUDE}],
            "principles": [RESPECTFUL]}
    r = httpx.post(server.url + "/v1/score", json=body, timeout=600).json()
    assert r["scores"][0] > r["scores"][1], r
    # Negating the principle flips the preference: the scorer reads the principle, not just fluency.
    neg = httpx.post(server.url + "/v1/score", json={**body, "negate": ["respectful"]}, timeout=600).json()
    assert neg["scores"][1] > neg["scores"][0], neg


def test_concise_principle_prefers_the_direct_answer(server):
    prompt = "What is the capital of France?"
    short = "Paris."
    padded = ("That is a great question, and I am so glad you asked it! Many people wonder about this. "
              "Well, after thinking about it carefully and considering many things, the capital is Paris.")
    r = httpx.post(server.url + "/v1/score", json={
        "items": [{"prompt": prompt, "response": short}, {"prompt": prompt, "response": padded}],
        "principle_set": "concise"}, timeout=600).json()
    assert r["scores"][0] > r["scores"][1], r
