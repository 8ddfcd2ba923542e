"""Fixtures shared by the data tests, and the fork server of the multi-process tests."""

import copy

import pytest

from tests import forked_ranks
from tests.helpers import TOKENIZER


@pytest.fixture(scope="session", autouse=True)
def rank_fork_server(request):
    """A session with multi-process tests starts their fork server first (RANK_ENV, the training imports): the token
    cache's build starts the process's one fork server too, with its own preloads, and whichever starts first serves
    every later fork of the session."""
    if any(item.get_closest_marker("e2e") for item in request.session.items):
        forked_ranks.start_server()


# A ChatML template, for tokenizers that render chat records with a template of their own.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """The bundled GPT-2 tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def chat_tok(tok):
    """The bundled tokenizer with a chat template."""
    t = copy.deepcopy(tok)
    t.chat_template = CHATML
    return t
