"""load_model: any GGUF file (the embedded one by name and by path), the tiny random Llama and
Qwen2, and clear errors for bad input."""
import json

import pytest
import torch

from analysis.harness import models
from analysis.harness.models import (ModelLoadError, build_tiny_llama, build_tiny_qwen2, load_model,
                                     tiny_llama_config)


def write_gguf(path, architecture: str, context_length: int | None = None):
    """A metadata-only GGUF (no tensors): enough for what load_model checks first."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    if context_length is not None:
        writer.add_context_length(context_length)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.embedded
def test_embedded_model_is_smollm2_with_recorded_identity(embedded):
    info = embedded.info
    assert info.name == "smollm2-135m-instruct" and info.source == "embedded-gguf"
    assert info.revision.startswith("gguf-sha256:") and len(info.revision) > 20
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (30, 3, 64)
    assert info.num_attention_heads == 9 and info.context_length == 8192
    assert info.rope["rope_theta"] == 100000.0
    assert info.dtype == "bfloat16" and info.device == "cpu"
    assert embedded.tokenizer.model_max_length == 8192
    assert embedded.tokenizer.chat_template, "the chat template must come with the GGUF tokenizer"


@pytest.mark.embedded
def test_embedded_model_answers_a_question(embedded):
    tok, model = embedded.tokenizer, embedded.model
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_tiny_llama_has_gqa_and_is_deterministic():
    cfg = tiny_llama_config()
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    a, b = build_tiny_llama(seed=3, vocab_size=64), build_tiny_llama(seed=3, vocab_size=64)
    c = build_tiny_llama(seed=4, vocab_size=64)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_random_llama3_8b_is_built_in_with_the_embedded_tokenizer(monkeypatch):
    """`--model random-llama3-8b`: the LLAMA3_8B shape (shrunk here: 16 GB on 2 cores is no
    unit test), random weights fixed by the seed, the embedded tokenizer's vocabulary."""
    from analysis.harness import models

    small = dict(models.LLAMA3_8B, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=256, num_hidden_layers=2)
    monkeypatch.setattr(models, "LLAMA3_8B", small)
    a, b = (load_model("random-llama3-8b", device="cpu") for _ in range(2))
    assert a.info.source == "random" and a.info.num_layers == 2 and a.info.num_kv_heads == 2
    assert a.info.vocab_size == len(a.tokenizer) and a.info.dtype == "bfloat16"
    assert a.info.context_length == small["max_position_embeddings"]
    assert torch.equal(a.model.model.layers[1].mlp.up_proj.weight, b.model.model.layers[1].mlp.up_proj.weight)
    assert torch.get_default_dtype() == torch.float32
    ids = a.tokenizer("The needle is", return_tensors="pt").input_ids
    assert a.model(ids).logits.shape == (1, ids.shape[1], len(a.tokenizer))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_unreachable_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not reach Hugging Face model"):
        load_model("someone/definitely-not-cached-model")


def test_non_causal_lm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_local_folder_loads_and_records_hash(tmp_path):
    loaded_tiny = load_model("tiny-random-llama", dtype="float32")
    loaded_tiny.model.save_pretrained(tmp_path)
    loaded_tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.info.source == "local" and loaded.info.revision.startswith("config-sha256:")
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, loaded_tiny.model(ids).logits, atol=1e-5)


def test_unknown_dtype_is_refused():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("tiny-random-llama", dtype="int3")


@pytest.mark.embedded
def test_a_gguf_path_loads_like_the_embedded_name(embedded):
    """The embedded model is a GGUF file found in its package: by path it is the same model
    (same folder, weights, geometry, context from the GGUF's metadata), named by its file."""
    path = models.embedded_gguf_path()
    by_path = load_model(str(path))
    a, b = embedded.info.to_dict(), by_path.info.to_dict()
    assert (b["name"], b["source"]) == (path.name, "gguf")
    assert {k: v for k, v in a.items() if k not in ("name", "source")} == \
        {k: v for k, v in b.items() if k not in ("name", "source")}
    assert b["sha256"] == models.file_sha256(path) and b["path"] == str(path.resolve())
    assert by_path.info.key["sha256"] == b["sha256"] and by_path.info.key["context_length"] == 8192
    assert "sha256" not in embedded.info.key          # shipped results keep their keys
    assert by_path.tokenizer.model_max_length == 8192 and by_path.tokenizer.chat_template
    # dequantised once: the same content under its file name reuses the embedded model's folder
    assert by_path.model.config.name_or_path == embedded.model.config.name_or_path
    ids = torch.tensor([[1, 5, 9, 11, 400, 2]])
    with torch.no_grad():
        assert torch.equal(embedded.model(ids).logits, by_path.model(ids).logits)


def test_gguf_metadata_gives_the_context_length(tmp_path):
    meta = models.gguf_metadata(write_gguf(tmp_path / "m.gguf", "qwen2", 32768))
    assert (meta.architecture, meta.context_length) == ("qwen2", 32768)


def test_unsupported_gguf_architecture_names_the_supported_ones(tmp_path):
    with pytest.raises(ModelLoadError, match=r"'bert' GGUF.*supported GGUF architectures: llama, "
                                             r"mistral, qwen2"):
        load_model(str(write_gguf(tmp_path / "bert.gguf", "bert")))
    with pytest.raises(ModelLoadError, match="'mamba' GGUF"):
        load_model(str(write_gguf(tmp_path / "ssm.gguf", "mamba")))


def test_broken_or_missing_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "half.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(bad))
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "nowhere.gguf"))


def test_tiny_qwen2_has_biases_gqa_tied_embeddings_and_is_deterministic():
    a, b = build_tiny_qwen2(seed=3, vocab_size=64), build_tiny_qwen2(seed=3, vocab_size=64)
    c = build_tiny_qwen2(seed=4, vocab_size=64)
    cfg = a.config
    assert cfg.model_type == "qwen2" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    biases = [a.model.layers[0].self_attn.k_proj.bias, b.model.layers[0].self_attn.k_proj.bias,
              c.model.layers[0].self_attn.k_proj.bias]
    assert biases[0].abs().min() > 0 and torch.equal(biases[0], biases[1])
    assert not torch.equal(biases[0], biases[2])
    # No token embeds to zero (transformers zeroes the padding row; a zero query is unmaskable).
    assert a.model.embed_tokens.weight.norm(dim=-1).min() > 0


def test_tiny_qwen2_is_built_in_with_the_embedded_tokenizer():
    loaded = load_model("tiny-random-qwen2", dtype="float32")
    info = loaded.info
    assert (info.name, info.source, info.revision) == ("tiny-random-qwen2", "tiny", "seed=0")
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (3, 2, 16)
    assert info.vocab_size == len(loaded.tokenizer) and info.rope["rope_theta"] == 1e6
    # Presses that load the tokenizer themselves (KVzip) find its folder in the config.
    assert (models.Path(loaded.model.config.name_or_path) / "tokenizer_config.json").is_file()
