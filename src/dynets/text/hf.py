"""The Hugging Face adapter: load a local encoder directory, rebuild an encoder from its config,
and build the attention mask the installed transformers version's layers expect.

transformers is optional (pip install dynets[text]) and imported only inside these functions, so
`import dynets` works without it. Everything is local: `local_files_only=True` everywhere, so a
missing file is an error here, never a download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model", "vocab.json")
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError)


def transformers_module() -> Any:
    """Import transformers on first use, with an install hint when it is missing."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "DynamicBert needs the Hugging Face `transformers` package: pip install dynets[text]"
        ) from e
    return transformers


def check_bert_like(module: nn.Module, where: str) -> None:
    """A BERT-family encoder exposes `embeddings` and `encoder.layer` (an nn.ModuleList)."""
    missing = [n for n in ("embeddings", "encoder") if not isinstance(getattr(module, n, None), nn.Module)]
    if not missing and not isinstance(getattr(module.encoder, "layer", None), nn.ModuleList):
        missing = ["encoder.layer (an nn.ModuleList)"]
    if missing:
        raise ValueError(
            f"{where}: expected a BERT-family encoder with `embeddings` and `encoder.layer`, got a "
            f"{type(module).__name__} without {', '.join(missing)}"
        )


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved in `directory`, or a ValueError naming the directory."""
    directory = Path(directory)
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"directory {directory} has no tokenizer: none of {list(_TOKENIZER_FILES)} found")
    try:
        tokenizer = transformers_module().AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except _LOAD_ERRORS as e:
        raise ValueError(f"directory {directory}: its tokenizer could not be loaded ({e})") from e
    if tokenizer.pad_token_id is None:
        raise ValueError(f"directory {directory}: the tokenizer has no pad token")
    return tokenizer


def load_encoder_dir(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(encoder, tokenizer) from a local Hugging Face directory of a BERT-family encoder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"encoder directory {str(path)!r} does not exist")
    tf = transformers_module()
    try:
        encoder = tf.AutoModel.from_pretrained(path, local_files_only=True)
    except _LOAD_ERRORS as e:
        raise ValueError(f"{path}: expected a Hugging Face model directory, could not load it ({e})") from e
    check_bert_like(encoder, f"encoder directory {path}")
    return encoder, load_tokenizer(path)


def encoder_from_config(encoder: dict[str, Any]) -> nn.Module:
    """Rebuild the (randomly initialised) encoder from its HF config dict; the weights come later."""
    tf = transformers_module()
    d = dict(encoder)
    cfg = tf.AutoConfig.for_model(d.pop("model_type", "bert"), **d)
    return tf.AutoModel.from_config(cfg)


def attention_mask(hf_config: Any, valid: torch.Tensor, h: torch.Tensor) -> Any:
    """The mask a layer of this transformers version expects for validity `valid` (B, L) bool.

    None when nothing is padded. transformers >= 4.5x builds it per attention implementation
    (a bool (B, 1, L, L) mask for SDPA, an additive float one for eager); older versions take the
    additive (B, 1, 1, L) extended mask.
    """
    if bool(valid.all()):
        return None
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        return (1.0 - valid[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    return create_bidirectional_mask(config=hf_config, inputs_embeds=h, attention_mask=valid)
