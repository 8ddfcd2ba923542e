"""Fixtures shared by the data tests."""

import copy

import pytest

from tests.helpers import TOKENIZER

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
