"""Tier 2: the data sources and the global-batch contract (no process group needed)."""

import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from paratrain.trainer.data import TrainBatches, ValBatches, checked_token_files, stdlib_files, token_files
from paratrain.trainer.errors import ConfigError
from paratrain.trainer.schema import DataConfig


def micro_batches(path, rank, world, accumulate, steps, batch=8, seq=16):
    it = iter(TrainBatches(path, seq, batch, seed=3, rank=rank, world_size=world, accumulate=accumulate))
    return [next(it) for _ in range(steps * accumulate)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"f{i:02d}.txt").write_text(f"file {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    cfg = OmegaConf.structured(DataConfig(source="text", path=str(root / "*.txt"), cache_dir=str(root / "cache")))
    return cfg, token_files(cfg)


def test_text_glob_is_split_by_file_and_cached(corpus):
    cfg, (train, val) = corpus
    train_tokens, val_tokens = np.fromfile(train, np.uint16), np.fromfile(val, np.uint16)
    total = sum(len(p.read_bytes()) for p in __import__("pathlib").Path(cfg.path).parent.glob("*.txt"))
    assert len(train_tokens) + len(val_tokens) == total and len(val_tokens) > 0
    assert token_files(cfg) == (train, val)  # cached: same files, not rebuilt
    assert train_tokens.max() < 256


@pytest.mark.parametrize("world,accumulate", [(2, 1), (4, 1), (2, 2), (1, 4)])
def test_global_batch_is_the_same_whatever_the_layout(corpus, world, accumulate):
    """At every step the union of all ranks' micro-batches is the single-process global batch, in order."""
    _, (train, _) = corpus
    steps = 3
    (reference,) = [micro_batches(train, 0, 1, 1, steps)]
    per_rank = [micro_batches(train, r, world, accumulate, steps) for r in range(world)]
    for s in range(steps):
        parts = [per_rank[r][s * accumulate + m][0] for m in range(accumulate) for r in range(world)]
        torch.testing.assert_close(torch.cat(parts), reference[s][0], rtol=0, atol=0)
    x, y = reference[0]
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes


def test_validation_batches_are_fixed_and_sliced_per_rank(corpus):
    _, (_, val) = corpus
    whole = ValBatches(val, 16, 8, 2, seed=3)
    halves = [ValBatches(val, 16, 8, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for i in range(2):
        torch.testing.assert_close(torch.cat([h[i][0] for h in halves]), whole[i][0], rtol=0, atol=0)
        torch.testing.assert_close(whole[i][0], ValBatches(val, 16, 8, 2, seed=3)[i][0], rtol=0, atol=0)


def test_token_file_source(tmp_path):
    tokens = (np.arange(5000) % 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "t.u16")
    cfg = OmegaConf.structured(DataConfig(source="tokens", path=str(tmp_path / "t.u16"), cache_dir=str(tmp_path / "c")))
    train, val = token_files(cfg)
    assert np.array_equal(np.concatenate([np.fromfile(train, np.uint16), np.fromfile(val, np.uint16)]), tokens)
    rewritten = tokens[::-1].copy()  # same path, same size: the cache must still notice
    rewritten.tofile(tmp_path / "t.u16")
    os.utime(tmp_path / "t.u16", ns=(0, 10**18))
    train, val = token_files(cfg)
    assert np.array_equal(np.concatenate([np.fromfile(train, np.uint16), np.fromfile(val, np.uint16)]), rewritten)


def test_a_single_text_file_is_split_by_its_tail(tmp_path):
    text = b"".join(b"line %05d of one long file\n" % i for i in range(2000))
    (tmp_path / "only.txt").write_bytes(text)
    cfg = OmegaConf.structured(DataConfig(source="text", path=str(tmp_path / "only.txt"), cache_dir=str(tmp_path / "c")))
    train, val = checked_token_files(cfg, vocab_size=256)
    cut = int(len(text) * (1 - cfg.val_fraction))
    assert np.fromfile(train, np.uint16).astype(np.uint8).tobytes() == text[:cut]
    assert np.fromfile(val, np.uint16).astype(np.uint8).tobytes() == text[cut:]


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    np.arange(4000, dtype=np.uint16).tofile(tmp_path / "t.u16")
    cfg = OmegaConf.structured(DataConfig(source="tokens", path=str(tmp_path / "t.u16"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match=r"token id \d+, but model\.vocab_size=256.*model\.vocab_size=4000"):
        checked_token_files(cfg, vocab_size=256)
    assert len(checked_token_files(cfg, vocab_size=4000)) == 2


def test_too_little_data_for_one_sequence_is_refused(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 1000)
    cfg = OmegaConf.structured(DataConfig(source="text", path=str(tmp_path / "short.txt"), seq_len=128,
                                          cache_dir=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match=r"validation split of 50 tokens.*data\.seq_len=128"):
        checked_token_files(cfg, vocab_size=256)
    (tmp_path / "tiny.txt").write_text("x")  # one byte: an empty training split
    cfg = OmegaConf.structured(DataConfig(source="text", path=str(tmp_path / "tiny.txt"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match=r"training split of 0 tokens"):
        checked_token_files(cfg, vocab_size=256)


def test_stdlib_corpus_is_real_source_without_tests():
    root, files = stdlib_files()
    names = [f.relative_to(root).as_posix() for f in files]
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith("test/") or "site-packages" in n for n in names)
    assert sum(f.stat().st_size for f in files) > 5_000_000
