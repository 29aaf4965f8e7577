"""load_model: the embedded GGUF, the tiny random Llama, and clear errors for bad input."""
import json

import pytest
import torch

from analysis.models import ModelLoadError, build_tiny_llama, load_model, tiny_llama_config


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
    from analysis import models

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
