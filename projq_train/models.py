"""Loading base models and tokenizers, and the architectures we support."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from projq_train.config import ModelConfig

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
        config = config or AutoConfig.from_pretrained(cfg.name_or_path, **extra)
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, config=config, **extra)
        if tokenizer.eos_token is None and config.eos_token_id is not None:
            # e.g. a tokenizer rebuilt from GGUF: the model config knows it
            eos = config.eos_token_id
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos if isinstance(eos, int) else eos[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """Load (or build, for ``cfg.config``) a supported causal LM in eval mode, and its tokenizer.

    The architecture is checked from the config before any weights are read.
    """
    dtype = getattr(torch, cfg.dtype)
    if cfg.config is not None:
        tokenizer = load_tokenizer(cfg)
        fields = dict(cfg.config)
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, **fields)
        check_architecture(config)
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        config = AutoConfig.from_pretrained(cfg.name_or_path, **extra)
        check_architecture(config)
        tokenizer = load_tokenizer(cfg, config)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=config, dtype=dtype, **extra)
    return model.eval(), tokenizer
