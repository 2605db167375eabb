"""Config-only model folders for engines' `--load-format dummy` (random weights, no download).

The tokenizer is word-level: token id i (i >= 3) is the word "w<i>", split on whitespace, so a
prompt of N words is exactly N tokens and the vocabulary size equals the config's vocab_size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tuner.models.shapes import ModelShape, get_shape

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
CACHE_ENV = "SERVETUNE_CACHE"


def word_for(token_id: int) -> str:
    return SPECIAL_TOKENS[token_id] if token_id < len(SPECIAL_TOKENS) else f"w{token_id}"


def model_config(shape: ModelShape, max_model_len: int | None = None) -> dict:
    """The Hugging Face config.json for the shape (Llama, or Qwen3-MoE when it has experts)."""
    config = {
        "architectures": [shape.architecture],
        "model_type": shape.model_type,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.dim_per_head,
        "max_position_embeddings": max_model_len or shape.max_position,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": shape.tie_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "rope_scaling": None,
        # a pre-5.0 version tells transformers 5.x this is not a Mistral tokenizer needing a fix
        "transformers_version": "4.51.0",
    }
    if shape.num_experts:
        config.update({
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "num_experts": shape.num_experts,
            "num_experts_per_tok": shape.experts_per_token,
            "moe_intermediate_size": shape.moe_intermediate_size,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": shape.num_layers,
        })
    else:
        config.update({"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "mlp_bias": False,
                       "pretraining_tp": 1})
    return config


def tokenizer_json(vocab_size: int) -> dict:
    vocab = {word_for(i): i for i in range(vocab_size)}
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": SPECIAL_TOKENS[UNK_ID]},
    }


def tokenizer_config(model_max_length: int) -> dict:
    unk, bos, eos = SPECIAL_TOKENS
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_stub_model(shape: ModelShape, out_dir: Path, max_model_len: int | None = None) -> Path:
    """Write config.json, tokenizer files and generation_config.json; unchanged files are kept."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(shape, max_model_len)
    files = {
        "config.json": config,
        "tokenizer.json": tokenizer_json(shape.vocab_size),
        "tokenizer_config.json": tokenizer_config(config["max_position_embeddings"]),
        "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID},
    }
    for name, content in files.items():
        _write_if_changed(out_dir / name, json.dumps(content, indent=1, sort_keys=True) + "\n")
    return out_dir


def stub_model_dir(shape_name: str, cache_root: Path | None = None) -> Path:
    """The stub folder for a preset shape under the servetune cache, written if missing."""
    root = Path(cache_root) if cache_root else _default_cache_root()
    return write_stub_model(get_shape(shape_name), root / "stub-models" / shape_name)


def _default_cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "servetune"


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)  # atomic: concurrent trials never read a half-written file
