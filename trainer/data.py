"""Byte-level token data: the embedded corpus, user text, token files, and the global-batch sampler.

Every source ends as two memory-mapped uint16 token files (train, val). Batches follow the
global-batch contract of DESIGN.md: at optimizer step s the global batch is a fixed set of
sequences drawn from (seed, s); each rank takes its contiguous slice of it, micro-batch by
micro-batch, so the model sees the same tokens at step s whatever the layout.
"""

import glob
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .errors import ConfigError

TOKEN_DTYPE = np.uint16


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("PARATRAIN_CACHE") or "~/.cache/paratrain"
    return Path(root).expanduser()


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's own .py sources, without its test suite and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files(pattern: str) -> tuple[Path, list[Path]]:
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not files:
        raise ConfigError(
            f"data.path={pattern!r} matches no file: data.source=text reads every file the glob "
            f"matches. Point data.path at your text, e.g. data.path='~/corpus/**/*.txt' (quote it)."
        )
    return Path(os.path.commonpath([str(p.parent) for p in files])), files


def is_val_file(relative_name: str, val_fraction: float) -> bool:
    """A file belongs to validation by a hash of its name: stable across machines and file order."""
    return zlib.crc32(relative_name.encode()) % 10_000 < val_fraction * 10_000


def _write_atomic(path: Path, tokens: np.ndarray) -> None:
    # Ranks or jobs may build the same cache at once: each writes its own file, then renames.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tokens.astype(TOKEN_DTYPE).tofile(tmp)
    os.replace(tmp, path)


def _cached_split(out: Path) -> tuple[Path, Path] | None:
    train, val, meta = out / "train.u16", out / "val.u16", out / "meta.json"
    return (train, val) if train.exists() and val.exists() and meta.exists() else None


def _write_split(out: Path, train: np.ndarray, val: np.ndarray) -> tuple[Path, Path]:
    """train.u16, val.u16 and meta.json, which keeps the largest id: every run checks it against
    model.vocab_size, and a scan of a large token file on every rank would cost seconds."""
    out.mkdir(parents=True, exist_ok=True)
    top = max((int(a.max()) for a in (train, val) if len(a)), default=0)
    tmp = out / f"meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"max_id": top, "train_tokens": len(train), "val_tokens": len(val)}))
    os.replace(tmp, out / "meta.json")
    _write_atomic(out / "val.u16", val)
    _write_atomic(out / "train.u16", train)  # last: _cached_split needs all three
    return out / "train.u16", out / "val.u16"


def build_text_cache(root: Path, files: list[Path], val_fraction: float, cache_dir: Path) -> tuple[Path, Path]:
    """Tokenise files to bytes once; later runs reuse the memory-mapped result."""
    names = [f.relative_to(root).as_posix() for f in files]
    key = hashlib.sha1(repr((sys.version, str(root), val_fraction, [(n, f.stat().st_size, f.stat().st_mtime_ns) for n, f in zip(names, files)])).encode())
    out = cache_dir / f"text-{key.hexdigest()[:16]}"
    if cached := _cached_split(out):
        return cached
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for name, f in zip(names, files):
        parts[is_val_file(name, val_fraction)].append(f.read_bytes())
    if not (parts[False] and parts[True]):
        # Too few files for a split by file (one file, say): validate on the tail of the text instead.
        text = b"".join(parts[False] + parts[True])
        cut = int(len(text) * (1 - val_fraction))
        parts = {False: [text[:cut]], True: [text[cut:]]}
    train, val = (np.frombuffer(b"".join(parts[is_val]), dtype=np.uint8) for is_val in (False, True))
    return _write_split(out, train, val)


def token_files(cfg) -> tuple[Path, Path]:
    """Resolve data.source to (train, val) uint16 token files, building caches where needed."""
    if cfg.source == "tokens":
        path = Path(os.path.expanduser(cfg.path))
        if not path.is_file():
            raise ConfigError(
                f"data.path={cfg.path!r} is not a file: data.source=tokens reads a flat file of "
                f"uint16 tokens. Give the path of such a file, or use data.source=text for raw text."
            )
        stat = path.stat()  # a rewritten file gets a new cache
        key = hashlib.sha1(repr((str(path.resolve()), stat.st_size, stat.st_mtime_ns, cfg.val_fraction)).encode())
        split = cache_root(cfg.cache_dir) / f"tokens-{key.hexdigest()[:16]}"
        if cached := _cached_split(split):
            return cached
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        cut = int(len(tokens) * (1 - cfg.val_fraction))
        return _write_split(split, np.asarray(tokens[:cut]), np.asarray(tokens[cut:]))
    root, files = stdlib_files() if cfg.source == "stdlib" else text_files(cfg.path)
    return build_text_cache(root, files, cfg.val_fraction, cache_root(cfg.cache_dir))


def load_tokens(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def checked_token_files(cfg, vocab_size: int) -> tuple[Path, Path]:
    """token_files, then the rules that need the tokens themselves: each split holds at least one
    sequence, and every id fits the model's embedding (else a crash deep inside the first step)."""
    paths = token_files(cfg)
    meta = json.loads((paths[0].parent / "meta.json").read_text())  # sizes from meta: an empty file cannot be mmapped
    for split, size in (("training", meta["train_tokens"]), ("validation", meta["val_tokens"])):
        if size < cfg.seq_len + 1:
            raise ConfigError(
                f"data.path={cfg.path!r} gives a {split} split of {size} tokens, fewer than one sequence of "
                f"data.seq_len={cfg.seq_len} plus its target: the split takes data.val_fraction={cfg.val_fraction} "
                f"of the data. Add data, lower data.seq_len, or adjust data.val_fraction."
            )
    top = meta["max_id"]
    if top >= vocab_size:
        raise ConfigError(
            f"data.path={cfg.path!r} holds token id {top}, but model.vocab_size={vocab_size}: every id must be "
            f"below the vocabulary size. Set model.vocab_size={top + 1} or larger, or re-tokenise the data."
        )
    return paths


def batch_offsets(num_tokens: int, seq_len: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """Start offsets of the `batch_size` sequences of global batch `index`: a pure function of its inputs."""
    rng = np.random.default_rng([seed, index])
    return rng.integers(0, num_tokens - seq_len - 1, size=batch_size)


def sequences(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[o : o + seq_len + 1] for o in offsets]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]  # inputs, next-byte targets: (B, T) each


class TrainBatches(IterableDataset):
    """Endless per-rank micro-batches: micro-batch m of step s is rank r's slice of sequences
    [m * B/A, (m + 1) * B/A) of global batch s (B global batch, A accumulation, W ranks)."""

    def __init__(self, path, seq_len, batch_size, seed, rank=0, world_size=1, accumulate=1, start_step=0):
        self.path, self.seq_len, self.batch_size, self.seed = path, seq_len, batch_size, seed
        self.rank, self.world_size, self.accumulate, self.start_step = rank, world_size, accumulate, start_step
        assert batch_size % (world_size * accumulate) == 0, "validate() checks divisibility"

    def __iter__(self):
        tokens = load_tokens(self.path)
        micro = self.batch_size // self.accumulate
        local = micro // self.world_size
        step = self.start_step
        while True:
            offsets = batch_offsets(len(tokens), self.seq_len, self.batch_size, self.seed, step)
            for m in range(self.accumulate):
                start = m * micro + self.rank * local
                yield sequences(tokens, offsets[start : start + local], self.seq_len)
            step += 1


class ValBatches(Dataset):
    """A fixed set of validation batches (the same at every validation), sliced per rank."""

    def __init__(self, path, seq_len, batch_size, num_batches, seed, rank=0, world_size=1):
        self.path, self.seq_len, self.batch_size, self.num_batches = path, seq_len, batch_size, num_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self):
        return self.num_batches

    def __getitem__(self, index):
        tokens = load_tokens(self.path)
        # A seed of its own, so validation never shares sequences' positions with training batches.
        offsets = batch_offsets(len(tokens), self.seq_len, self.batch_size, self.seed + 7919, index)
        local = self.batch_size // self.world_size
        return sequences(tokens, offsets[self.rank * local : (self.rank + 1) * local], self.seq_len)


class ByteDataModule(L.LightningDataModule):
    """Loaders over resolved token files (checked_token_files, called once before any process starts)."""

    def __init__(self, cfg, train_path: Path, val_path: Path, seed: int, accumulate: int = 1, start_step: int = 0):
        super().__init__()
        self.cfg, self.seed, self.accumulate, self.start_step = cfg, seed, accumulate, start_step
        self.train_path, self.val_path = train_path, val_path

    def _rank(self):
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        # The strategy says which slice a rank reads (a pipeline's stages share one).
        kw = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return kw.get("rank", trainer.global_rank), kw.get("num_replicas", trainer.world_size)

    def train_dataloader(self):
        rank, world = self._rank()
        c = self.cfg
        # Lightning asks for the loader after restoring a checkpoint: a resumed run reads on from
        # its global step (the data order is a pure function of (seed, step)).
        start = self.trainer.global_step if self.trainer is not None else self.start_step
        data = TrainBatches(self.train_path, c.seq_len, c.batch_size, self.seed, rank, world, self.accumulate, start)
        return DataLoader(data, batch_size=None)

    def val_dataloader(self):
        rank, world = self._rank()
        c = self.cfg
        data = ValBatches(self.val_path, c.seq_len, c.batch_size, c.val_batches, self.seed, rank, world)
        return DataLoader(data, batch_size=None)
