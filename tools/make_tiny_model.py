"""Write a small randomly initialised Hugging Face model directory (safetensors + config + tokenizer).

Used by the CPU demo and the tests: no model hub is needed. Example:
    python tools/make_tiny_model.py --output runs/tiny-gptneox --hidden-size 128 --num-layers 4
"""

import argparse
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOKENIZER = os.path.join(REPO, "assets", "tokenizer")


MODEL_TYPES = ("gptneox", "gptj", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def build_config(model_type, hidden, layers, heads, vocab, max_positions, kv_heads=None, tied=False, window=None):
    """A transformers config of `model_type`; `window`: the sliding window of the families that have one (Qwen2
    slides on its upper half of layers, Gemma alternates, Mistral and Phi-3 slide everywhere)."""
    import transformers
    from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig

    if model_type == "gptneox":
        return GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            rotary_pct=0.25,
            max_position_embeddings=max_positions,
            use_parallel_residual=True,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
    if model_type == "gptj":
        return GPTJConfig(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            rotary_dim=max(2, hidden // heads // 2),
            n_positions=max_positions,
            tie_word_embeddings=False,
        )
    if model_type == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            intermediate_size=int(8 * hidden / 3) // 8 * 8,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tied,
        )
    if model_type not in MODEL_TYPES:
        raise SystemExit(f"error: --model-type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=int(8 * hidden / 3) // 8 * 8,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
    )
    if model_type == "qwen2":
        slide = dict(use_sliding_window=True, sliding_window=window, max_window_layers=layers // 2) if window else {}
        return transformers.Qwen2Config(**common, **slide)
    if model_type == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=2 * hidden // heads)  # head_dim apart from hidden/heads
    if model_type == "mistral":
        return transformers.MistralConfig(**common, sliding_window=window)
    if model_type == "phi3":
        return transformers.Phi3Config(**common, sliding_window=window, pad_token_id=None)
    gemma = dict(head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads, sliding_window=window or 4096)
    if model_type == "gemma2":
        return transformers.Gemma2Config(**common, **gemma)
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return transformers.Gemma3TextConfig(**common, **gemma, layer_types=layer_types)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--model-type", default="gptneox", help=", ".join(MODEL_TYPES))
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None, help="llama: grouped-query attention")
    parser.add_argument("--tie-word-embeddings", action="store_true", help="share embedding and head (not GPT-NeoX/J)")
    parser.add_argument("--sliding-window", type=int, default=None, help="the families with sliding-window layers")
    parser.add_argument("--max-positions", type=int, default=2048)
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: tokenizer size rounded up to 128")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(args.tokenizer):
        print(f"error: --tokenizer {args.tokenizer}: no such directory", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = args.vocab_size or (len(tokenizer) + 127) // 128 * 128
    config = build_config(
        args.model_type,
        args.hidden_size,
        args.num_layers,
        args.num_heads,
        vocab,
        args.max_positions,
        args.num_kv_heads,
        args.tie_word_embeddings,
        args.sliding_window,
    )
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    for extra in os.listdir(args.tokenizer):
        if extra.startswith("LICENSE"):
            shutil.copy2(os.path.join(args.tokenizer, extra), args.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.model_type} model ({n / 1e6:.1f}M parameters) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
