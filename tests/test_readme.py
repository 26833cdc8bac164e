"""Every command the README prints in a ```bash block, run as printed (shortened), so none can be wrong.

The commands are read from README.md, not copied here: a new or changed example is tested as soon
as it is written. Each runs through bash in one sandbox directory, in README order (a later example
may use what an earlier one wrote, e.g. `paratrain-export outputs/my-run ...`), with SHRINK appended
to every `train` command: a tiny model and 2 steps, so the README's test costs minutes, not hours.

A command that cannot run on this machine is listed in SKIP with the reason. A skipped `train`
command is still composed and validated here, job by job, exactly as `train` would before starting
anything: a skipped example can be unrunnable here, never invalid.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = str(Path(sys.executable).parent)
SHRINK = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "data.batch_size=8",
          "data.seq_len=32", "data.val_batches=2", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
          "trainer.checkpoint_every_n_steps=2", "optimizer.warmup_steps=1"]


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def _no_slurm_multinode() -> bool:
    return True  # the cluster .ci/slurm-up.sh starts has one node


def _not_root() -> bool:
    return os.geteuid() != 0 or shutil.which("sudo") is None


# (pattern in the command, why it cannot run here, when that holds)
SKIP = [
    (r"\bpip install\b", "creates a virtual environment from PyPI (network, minutes): .ci/run does it on a fresh machine",
     lambda: True),
    (r"\bpython -m pytest\b", "runs the whole test suite, which contains this test", lambda: True),
    (r"trainer\.accelerator=gpu", "needs CUDA GPUs", _no_cuda),
    (r"trainer\.num_nodes=[2-9]", "needs a SLURM cluster of several nodes; the local one has one", _no_slurm_multinode),
    (r"^sudo ", "needs root and sudo", _not_root),
]
# Placeholders the README asks the reader to fill in, and what fills them here.
PLACEHOLDERS = {"multirun/DATE/TIME": lambda sandbox: str(newest(sandbox, "multirun/*/*")),
                "/data/train.u16": lambda sandbox: str(sandbox / "train.u16")}


def readme_commands() -> list[str]:
    """Each command of each ```bash block: continuation lines joined, trailing comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def newest(sandbox: Path, pattern: str) -> Path:
    found = sorted(sandbox.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"no {pattern} under {sandbox}: the README uses it before an example makes one"
    return found[-1]


def is_train(tokens: list[str]) -> bool:
    return tokens[:1] == ["train"] or "paratrain.trainer.cli" in tokens


def skip_reason(command: str) -> str | None:
    for pattern, reason, holds in SKIP:
        if re.search(pattern, command) and holds():
            return reason
    return None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A directory to run the examples in, with a HOME that has a ~/corpus for `data=text`, and a token file."""
    import array

    root = tmp_path_factory.mktemp("readme")
    with open(root / "train.u16", "wb") as f:  # byte values as uint16 tokens: below vocab_size=256
        array.array("H", list((REPO / "trainer" / "cli.py").read_bytes() * 20)).tofile(f)
    corpus = root / "home" / "corpus" / "src"
    corpus.mkdir(parents=True)
    for source in sorted((REPO / "trainer").glob("*.py")):
        (corpus / f"{source.stem}.txt").write_text(source.read_text())
    try:  # `model.init_from=~/models/tiny-mixtral`: a tiny random Mixtral, saved as Hugging Face saves one
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return root
    config = MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, tie_word_embeddings=False)
    MixtralForCausalLM(config).save_pretrained(root / "home" / "models" / "tiny-mixtral")
    return root


def shrink(command: str) -> str:
    """The tiny, 2-step version of a `train` command; a model read from init_from keeps its own shape,
    and a dry run plans the real model."""
    if "dry_run=true" in command:
        return command
    keep = [k for k in SHRINK if not ("init_from" in command and k.startswith("model."))]
    return f"{command} {' '.join(keep)}"


def validate_as_train_would(tokens: list[str]) -> int:
    """Compose and validate every job of a `train [-m] OVERRIDES` command in-process; returns the job count."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from paratrain.trainer.errors import quote_home_paths
    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs
    from paratrain.trainer.validate import validate, validate_cluster

    register_configs()
    register_recipes()
    args = quote_home_paths([t for t in tokens[1:] if t not in ("-m", "--multirun")])
    overrides = [a for a in args if not a.startswith("hydra.")]
    jobs = [overrides]
    if "-m" in tokens or "--multirun" in tokens:
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    for job in jobs:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", list(job))
        validate(cfg, announce=False)
        validate_cluster(cfg)
    return len(jobs)


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_test():
    assert len(COMMANDS) >= 15 and any(c.startswith("train -m") for c in COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c[:70] for c in COMMANDS])
def test_readme_command_works_as_printed(command, sandbox):
    reason = skip_reason(command)
    tokens = shlex.split(command)
    if reason:
        if is_train(tokens):
            validate_as_train_would(tokens)  # raises the ConfigError `train` would exit 2 with
        pytest.skip(f"validated, not run: {reason}" if is_train(tokens) else reason)
    for placeholder, fill in PLACEHOLDERS.items():
        if placeholder in command:
            command = command.replace(placeholder, fill(sandbox))
    if is_train(tokens):
        command = shrink(command)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "HOME": str(sandbox / "home")}
    done = subprocess.run(command, shell=True, executable="/bin/bash", cwd=sandbox, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, f"{command}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    if is_train(tokens) and "dry_run=true" in tokens:
        assert "plan written to" in done.stdout, done.stdout[-3000:]
    elif is_train(tokens) and "--cfg" not in tokens:
        assert re.search(r"run completed: 2/2 steps", done.stdout), done.stdout[-3000:]
