"""Tokenizers: raw bytes (the default) or a Hugging Face `tokenizers` file (`paratrain-tokenizer train` makes one).

    train data.tokenizer=bpe.json                                            # model.vocab_size follows

`data.tokenizer=bytes` maps each byte to its id (vocabulary 256). A tokenizer file changes the
token cache (its key holds the file's hash) and the vocabulary; every token's length in bytes
(`token_bytes`) lets validation report loss per byte, comparable across tokenizers. The
`tokenizers` package is needed only when a tokenizer file is used.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError

BYTES = "bytes"
MAX_VOCAB = 2 ** 16  # token caches are uint16
EXTRA = "pip install 'paratrain[hf]'"


def is_bytes(spec) -> bool:
    return spec in (None, "", BYTES)


def require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"data.tokenizer needs the `tokenizers` package, which is not installed. Install it with "
                          f"{EXTRA} (or pip install tokenizers), or use data.tokenizer=bytes.") from None
    return tokenizers


def load(spec):
    """The tokenizers.Tokenizer a data.tokenizer path names. Raises ConfigError for a missing or invalid file."""
    path = Path(os.path.expanduser(str(spec)))
    fix = ("Give the path of a tokenizer.json (what `paratrain-tokenizer train` or a Hugging Face tokenizer's "
           "save writes), or data.tokenizer=bytes.")
    if not path.is_file():
        raise ConfigError(f"data.tokenizer={spec!r} is not a file. {fix}")
    tokenizers = require_tokenizers()
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        first = (str(e).splitlines() or [""])[0][:200]
        raise ConfigError(f"data.tokenizer={spec!r} is not a tokenizer file ({first}). {fix}") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > MAX_VOCAB:
        raise ConfigError(f"data.tokenizer={spec!r} has {size} tokens, more than the {MAX_VOCAB} a uint16 token cache "
                          f"holds. Use a tokenizer of at most {MAX_VOCAB} tokens.")
    return tok


def vocab_size(spec) -> int:
    return 256 if is_bytes(spec) else load(spec).get_vocab_size(with_added_tokens=True)


def fingerprint(spec) -> str:
    """What the token cache keys on: 'bytes', or the tokenizer file's content hash."""
    if is_bytes(spec):
        return BYTES
    return hashlib.sha1(Path(os.path.expanduser(str(spec))).read_bytes()).hexdigest()


def encode(spec, texts: list[bytes]) -> list[np.ndarray]:
    """Token ids (uint16) of each text. Text is decoded as UTF-8 (invalid bytes replaced) for a tokenizer file."""
    if is_bytes(spec):
        return [np.frombuffer(t, dtype=np.uint8).astype(np.uint16) for t in texts]
    tok = load(spec)
    strings = [t.decode("utf-8", errors="replace") for t in texts]
    return [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch_fast(strings, add_special_tokens=False)]


def text_bytes(spec, texts: list[bytes]) -> int:
    """Bytes of the text the tokens stand for (after UTF-8 replacement, for a tokenizer file)."""
    if is_bytes(spec):
        return sum(len(t) for t in texts)
    return sum(len(t.decode("utf-8", errors="replace").encode("utf-8")) for t in texts)


def token_bytes(spec) -> np.ndarray:
    """(V,) bytes of text each token id stands for: exact for bytes and for byte-level BPE (each character of a
    byte-level token is one byte), from decoding a single token otherwise; special tokens count 0."""
    if is_bytes(spec):
        return np.ones(256, dtype=np.float64)
    tok = load(spec)
    size = tok.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    byte_level = type(tok.decoder).__name__ == "ByteLevel"
    out = np.zeros(size, dtype=np.float64)
    for i in range(size):
        if i in special:
            continue
        piece = tok.id_to_token(i)
        out[i] = len(piece) if byte_level and piece is not None else len(tok.decode([i]).encode("utf-8"))
    return out


def data_token_bytes(data_cfg) -> np.ndarray | None:
    """token_bytes of the run's data; None where unknown (a token file with no tokenizer file)."""
    spec = data_cfg.get("tokenizer", BYTES)
    return None if data_cfg.source == "tokens" and is_bytes(spec) else token_bytes(spec)


def fill_vocab_size(cfg, explicit: dict) -> None:
    """model.vocab_size follows data.tokenizer, unless set explicitly or by model.init_from (then it must hold every id)."""
    spec = cfg.data.get("tokenizer", BYTES)
    if is_bytes(spec):
        return
    size = vocab_size(spec)
    fixed_by = ("model.init_from" if cfg.model.get("init_from") else
                "model.vocab_size" if "model.vocab_size" in explicit else None)
    if fixed_by is None:
        cfg.model.vocab_size = size
    elif cfg.model.vocab_size < size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} (from {fixed_by}) is smaller than data.tokenizer="
                          f"{spec!r}, which has {size} tokens: every token id must have an embedding row. Drop the "
                          f"override (model.vocab_size follows the tokenizer), or use a smaller tokenizer.")
