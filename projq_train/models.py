"""Loading base models and tokenizers, and the architectures we support."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from projq_train.config import ModelConfig
from projq_train.weights import local_folder

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def check_architecture(config: PretrainedConfig) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {config.model_type!r}: projq-train supports decoder-only "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a supported causal LM."""
    return model.model.layers


def layer_output(out: Tensor | tuple) -> Tensor:
    """The hidden states a decoder layer's forward returns (alone, or first of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A download-free byte-level tokenizer (3 special tokens + 256 bytes) for random tiny models."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({ch: i + len(BYTE_SPECIAL_TOKENS) for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def resolve_device(device: str) -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(cfg: ModelConfig, config: PretrainedConfig | None = None) -> PreTrainedTokenizerFast:
    """The model's tokenizer (the byte tokenizer for a model built from ``cfg.config``), with a pad
    token. ``config``: the model's config when already read (a GGUF file is slow to parse)."""
    if cfg.config is not None:
        tokenizer = byte_tokenizer()
    else:
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        source = local_folder(cfg.name_or_path) or cfg.name_or_path
        config = config or AutoConfig.from_pretrained(source, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, config=config, **extra)
        if tokenizer.eos_token is None and config.eos_token_id is not None:
            # e.g. a tokenizer rebuilt from GGUF: the model config knows it
            eos = config.eos_token_id
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos if isinstance(eos, int) else eos[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The base model's ``transformers`` config, read without any weights (a random model's
    vocabulary defaults to the byte tokenizer's); the architecture is checked."""
    if cfg.config is not None:
        fields = dict(cfg.config)
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", len(BYTE_SPECIAL_TOKENS) + 256)
        config = AutoConfig.for_model(model_type, **fields)
    else:
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        config = AutoConfig.from_pretrained(local_folder(cfg.name_or_path) or cfg.name_or_path, **extra)
    check_architecture(config)
    if hasattr(config, "quantization_config"):  # e.g. GGUF: our models hold plain tensors
        del config.quantization_config
    return config


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` in eval mode with every tensor on the meta device (no memory),
    except the rotary embedding, whose few non-persistent buffers are computed from the config."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()


def tie_and_check(model: nn.Module) -> nn.Module:
    """Re-tie shared weights after tensors were assigned, and check nothing is left on meta."""
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ValueError(f"tensors {missing[:3]} ({len(missing)} in all) were never loaded")
    return model


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """Load (or build, for ``cfg.config``) the float causal LM in eval mode, and its tokenizer.

    The architecture is checked from the config before any weights are read. A random model
    is filled tensor by tensor from :class:`~projq_train.weights.RandomInitSource`, the same
    tensors a streamed quantization reads.
    """
    from projq_train.weights import RandomInitSource, materialize

    dtype = getattr(torch, cfg.dtype)
    config = model_config(cfg)
    tokenizer = load_tokenizer(cfg, config)
    if cfg.config is not None:
        model = build_skeleton(config, dtype)
        materialize(model, "", RandomInitSource(model, cfg.seed), dtype)
        tie_and_check(model)
    else:
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=config, dtype=dtype, **extra)
    return model.eval(), tokenizer
