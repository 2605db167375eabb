"""Config-only stub model folders: config fields, word-level tokenizer, idempotent writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.errors import InputError
from tuner.models.shapes import PRESETS, ModelShape
from tuner.models.stub import stub_model_dir, write_stub_model


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("shape_name", ["tiny-llama", "llama-3.2-1b"])
def test_dense_config_matches_shape(tmp_path: Path, shape_name: str) -> None:
    shape = PRESETS[shape_name]
    config = read_json(write_stub_model(shape, tmp_path) / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == shape.hidden_size
    assert config["intermediate_size"] == shape.intermediate_size
    assert config["num_hidden_layers"] == shape.num_layers
    assert config["num_attention_heads"] == shape.num_heads
    assert config["num_key_value_heads"] == shape.num_kv_heads
    assert config["head_dim"] == shape.hidden_size // shape.num_heads
    assert config["vocab_size"] == shape.vocab_size
    assert config["max_position_embeddings"] == shape.max_position
    assert config["tie_word_embeddings"] is shape.tie_embeddings
    assert "num_experts" not in config


def test_moe_config_uses_qwen3_moe_field_names(tmp_path: Path) -> None:
    shape = PRESETS["qwen3-30b-a3b"]
    config = read_json(write_stub_model(shape, tmp_path) / "config.json")
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["model_type"] == "qwen3_moe"
    assert config["num_experts"] == 128
    assert config["num_experts_per_tok"] == 8
    assert config["moe_intermediate_size"] == 768
    assert config["head_dim"] == 128  # not hidden_size // heads (64)
    assert config["num_key_value_heads"] == 4
    assert config["num_hidden_layers"] == 48
    assert config["decoder_sparse_step"] == 1
    assert config["mlp_only_layers"] == []
    assert config["vocab_size"] == 151936


def test_max_model_len_caps_positions_and_tokenizer(tmp_path: Path) -> None:
    out = write_stub_model(PRESETS["tiny-llama"], tmp_path, max_model_len=2048)
    assert read_json(out / "config.json")["max_position_embeddings"] == 2048
    assert read_json(out / "tokenizer_config.json")["model_max_length"] == 2048


def test_tokenizer_vocabulary_is_w_words_of_config_size(tmp_path: Path) -> None:
    shape = PRESETS["tiny-llama"]
    out = write_stub_model(shape, tmp_path)
    tokenizer = read_json(out / "tokenizer.json")
    vocab = tokenizer["model"]["vocab"]
    assert len(vocab) == read_json(out / "config.json")["vocab_size"] == shape.vocab_size
    assert {vocab["<unk>"], vocab["<s>"], vocab["</s>"]} == {0, 1, 2}
    by_id = {token_id: word for word, token_id in vocab.items()}
    assert all(by_id[i] == f"w{i}" for i in range(3, shape.vocab_size))
    assert tokenizer["model"]["type"] == "WordLevel"
    assert tokenizer["pre_tokenizer"] == {"type": "WhitespaceSplit"}
    assert [t["id"] for t in tokenizer["added_tokens"] if t["special"]] == [0, 1, 2]


def test_large_vocabulary_has_every_id_once(tmp_path: Path) -> None:
    shape = PRESETS["qwen3-30b-a3b"]
    vocab = read_json(write_stub_model(shape, tmp_path) / "tokenizer.json")["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(shape.vocab_size))


def test_tokenizer_config_and_generation_config_name_the_specials(tmp_path: Path) -> None:
    out = write_stub_model(PRESETS["tiny-llama"], tmp_path)
    tokenizer_config = read_json(out / "tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<s>", "</s>")
    assert "messages" in tokenizer_config["chat_template"]
    assert read_json(out / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": 2}


def test_rewriting_same_shape_leaves_files_untouched(tmp_path: Path) -> None:
    shape = PRESETS["tiny-llama"]
    out = write_stub_model(shape, tmp_path)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["config.json", "generation_config.json", "tokenizer.json",
                                       "tokenizer_config.json"]
    before = {f.name: f.stat().st_mtime_ns for f in files}
    write_stub_model(shape, tmp_path)
    assert {f.name: f.stat().st_mtime_ns for f in sorted(out.iterdir())} == before


def test_changed_shape_rewrites_config(tmp_path: Path) -> None:
    shape = PRESETS["tiny-llama"]
    write_stub_model(shape, tmp_path)
    wider = ModelShape(**{**shape.__dict__, "hidden_size": 256})
    config = read_json(write_stub_model(wider, tmp_path) / "config.json")
    assert config["hidden_size"] == 256
    assert not list(tmp_path.glob(".*.tmp"))


def test_stub_model_dir_writes_under_cache_root(tmp_path: Path) -> None:
    out = stub_model_dir("tiny-llama", cache_root=tmp_path)
    assert out == tmp_path / "stub-models" / "tiny-llama"
    assert read_json(out / "config.json")["vocab_size"] == PRESETS["tiny-llama"].vocab_size


def test_stub_model_dir_honours_servetune_cache(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVETUNE_CACHE", str(tmp_path))
    assert stub_model_dir("tiny-llama") == tmp_path / "stub-models" / "tiny-llama"
    assert (tmp_path / "stub-models" / "tiny-llama" / "tokenizer.json").is_file()


def test_stub_model_dir_rejects_unknown_shape(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown model shape 'no-such'"):
        stub_model_dir("no-such", cache_root=tmp_path)
