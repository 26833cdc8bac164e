"""Tokenizers: `paratrain-tokenizer train` on the embedded corpus, then `train data.tokenizer=FILE`.

Bounds, stated: (1) loss per byte is exact bookkeeping: val/loss_per_byte = val/loss / (bytes per target
token of the very validation windows), recomputed here to 1e-5 rel; the byte model's per-byte loss is
its per-token loss. (2) Every byte of the validation split is accounted for: the byte lengths of its
tokens add up to its text, exactly. (3) Learning: after 60 steps both the BPE and the byte model are
below the validation split's byte-unigram entropy in bits per byte (what a model that learned only
byte frequencies scores), and the BPE model below the byte model; the figures are printed side by side.
"""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import TINY, metrics, summary, train

pytest.importorskip("tokenizers")

from paratrain.trainer import tokenizer  # noqa: E402
from paratrain.trainer.errors import ConfigError  # noqa: E402

VOCAB = 512
RUN = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.val_check_interval", "trainer.checkpoint",
                                            "trainer.log_every", "data.seq_len", "data.val_batches"))]
RUN += ["trainer.max_steps=60", "trainer.val_check_interval=30", "trainer.checkpoint_every_n_steps=60",
        "trainer.log_every_n_steps=10", "data.seq_len=64", "data.val_batches=4"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe.json"
    done = subprocess.run([sys.executable, "-m", "paratrain.trainer.tokenizer_train", "train", "--vocab-size", str(VOCAB),
                           "--max-bytes", "3000000", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{VOCAB} tokens" in done.stdout
    return out


def test_trained_tokenizer_round_trips_text_and_knows_each_tokens_bytes(bpe):
    tok = tokenizer.load(bpe)
    assert tok.get_vocab_size() == VOCAB
    text = Path(json.__file__).read_text() + "\u00e9\u4e2d \x00 tabs\t\n"  # byte-level: any text, no unknown token
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) < 0.7 * len(text.encode())  # Python source compresses (vocabulary 512: ~1.8 bytes per token)
    lengths = tokenizer.token_bytes(bpe)
    assert lengths.sum() > 0 and lengths[ids].sum() == len(text.encode())


def test_bpe_run_reports_loss_per_token_and_per_byte(bpe, tmp_path):
    from paratrain.trainer.data import ValBatches, token_files
    from paratrain.trainer.schema import DataConfig

    runs = {"bpe": [*RUN, f"data.tokenizer={bpe}"], "bytes": RUN}
    rows = {}
    for name, args in runs.items():
        done = train(args, tmp_path / name, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows[name] = [r for r in metrics(tmp_path / name) if r["val/loss"]]
        assert [int(r["step"]) for r in rows[name]] == [30, 60]
    # model.vocab_size followed the tokenizer: embedding + head of VOCAB rows
    assert summary(tmp_path / "bpe")["params_total"] - summary(tmp_path / "bytes")["params_total"] == 2 * (VOCAB - 256) * 32

    data = OmegaConf.structured(DataConfig(batch_size=8, seq_len=64, val_batches=4, tokenizer=str(bpe)))
    val_path = token_files(data)[1]
    meta = json.loads((val_path.parent / "meta.json").read_text())
    assert meta["tokenizer"] == tokenizer.fingerprint(bpe)  # the cache is keyed on (and records) the tokenizer
    lengths = tokenizer.token_bytes(bpe)
    val_tokens = np.fromfile(val_path, dtype=np.uint16)
    assert lengths[val_tokens].sum() == meta["val_bytes"]  # bound (2): exact

    windows = ValBatches(val_path, 64, 8, 4, seed=1234)
    bytes_per_token = np.mean([lengths[windows[i][1].numpy()].mean() for i in range(4)])
    for r in rows["bpe"]:
        assert float(r["val/loss_per_byte"]) == pytest.approx(float(r["val/loss"]) / bytes_per_token, rel=1e-5)
        assert float(r["val/bits_per_byte"]) == pytest.approx(float(r["val/loss_per_byte"]) / math.log(2), rel=1e-6)
    for r in rows["bytes"]:
        assert float(r["val/loss_per_byte"]) == pytest.approx(float(r["val/loss"]), rel=1e-6)

    byte_val = np.fromfile(token_files(OmegaConf.structured(DataConfig()))[1], dtype=np.uint16)
    counts = np.array(list(Counter(byte_val.tolist()).values()), dtype=np.float64)
    unigram_bits = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    final = {name: float(r[-1]["val/bits_per_byte"]) for name, r in rows.items()}
    print(f"val bits/byte after 60 steps: bpe {final['bpe']:.3f}, bytes {final['bytes']:.3f}; "
          f"byte-unigram entropy {unigram_bits:.3f}; bpe bytes/token {bytes_per_token:.2f}")
    assert final["bpe"] < unigram_bits and final["bytes"] < unigram_bits, (final, unigram_bits)
    # Same steps, same sequences of 64 tokens: BPE tokens carry ~2 bytes each, so it has seen more text and
    # more context (measured: 3.63 vs 4.40 bits/byte; unigram 4.62).
    assert final["bpe"] < final["bytes"], final


def test_tokenizer_rules(bpe, tmp_path):
    from paratrain.trainer.schema import RunConfig

    (tmp_path / "not.json").write_text('{"hello": "world"}')
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*not\.json.* is not a tokenizer file"):
        tokenizer.load(tmp_path / "not.json")
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*missing\.json.* is not a file"):
        tokenizer.load(tmp_path / "missing.json")
    cfg = OmegaConf.structured(RunConfig)
    cfg.data.tokenizer = str(bpe)
    tokenizer.fill_vocab_size(cfg, explicit={})
    assert cfg.model.vocab_size == VOCAB
    cfg.model.vocab_size = 300
    with pytest.raises(ConfigError, match=rf"model\.vocab_size=300 .* has {VOCAB} tokens"):
        tokenizer.fill_vocab_size(cfg, explicit={"model.vocab_size": "300"})
    cfg.model.vocab_size = 1024  # larger than the tokenizer (padding rows): allowed
    tokenizer.fill_vocab_size(cfg, explicit={"model.vocab_size": "1024"})
    assert cfg.model.vocab_size == 1024


def test_a_file_that_is_not_a_tokenizer_exits_2_before_spawning(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\nc\n")
    done = train([*TINY, f"data.tokenizer={tmp_path / 'vocab.txt'}", "strategy=ddp", "trainer.devices=2"],
                 tmp_path / "run", timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "is not a tokenizer file" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()
