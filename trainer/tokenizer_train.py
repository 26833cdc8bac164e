"""`paratrain-tokenizer train`: a byte-level BPE tokenizer trained on the training split of a corpus.

    paratrain-tokenizer train --vocab-size 1024 --out bpe.json               # the embedded corpus
    paratrain-tokenizer train --data '~/corpus/**/*.txt' --vocab-size 8000 --out bpe.json
    train data.tokenizer=bpe.json                                            # then train with it

Files that `train` holds out for validation (the same hash of their names, data.val_fraction) are
never seen by the tokenizer, so validation loss stays honest.
"""

import argparse
import sys
from pathlib import Path

from .data import corpus_files, is_val_file
from .errors import ConfigError
from .tokenizer import MAX_VOCAB, require_tokenizers


def train_bpe(texts, vocab_size: int, out, min_frequency: int = 2):
    """A byte-level BPE tokenizer (every byte representable, no unknown token) trained on `texts`; saved to out."""
    tokenizers = require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not 256 <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"--vocab-size={vocab_size} must be between 256 (the byte alphabet) and {MAX_VOCAB} (uint16 "
                          f"token caches). Use e.g. --vocab-size 8000.")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return tok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="paratrain-tokenizer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus (its training split only)")
    t.add_argument("--data", default="stdlib", help="stdlib (the embedded corpus, default) or a glob of text files")
    t.add_argument("--vocab-size", type=int, default=8000, help="tokens, 256..65536 (default 8000)")
    t.add_argument("--out", required=True, help="where to write the tokenizer.json")
    t.add_argument("--val-fraction", type=float, default=0.05,
                   help="files held out as `train` holds them out (data.val_fraction): never seen by the tokenizer")
    t.add_argument("--max-bytes", type=int, default=None, help="train on the first this many bytes of the corpus")
    args = parser.parse_args(argv)
    try:
        root, files = corpus_files(args.data)
        texts, total = [], 0
        for f in files:
            if is_val_file(f.relative_to(root).as_posix(), args.val_fraction):
                continue
            if args.max_bytes is not None and total >= args.max_bytes:
                break
            texts.append(f.read_bytes())
            total += len(texts[-1])
        tok = train_bpe(texts, args.vocab_size, args.out)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens, trained on {len(texts)} files ({total / 1e6:.1f} MB); "
          f"use it with `train data.tokenizer={args.out}`")


if __name__ == "__main__":
    main()
