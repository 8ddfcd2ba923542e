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


def build_config(model_type, hidden, layers, heads, vocab, max_positions, kv_heads=None, tied=False):
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
    raise SystemExit(f"error: --model-type must be gptneox, gptj or llama, got {model_type!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--model-type", default="gptneox")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None, help="llama: grouped-query attention")
    parser.add_argument("--tie-word-embeddings", action="store_true", help="llama: share embedding and head")
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
