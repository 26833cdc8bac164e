"""Helpers shared by the bench scripts: the environment of a timed run, the real `train` command,
the composed config, and the note on machine load that every table ends with."""

import os
import sys
from pathlib import Path


def bench_env() -> dict:
    """One thread per process (DESIGN.md), and no rank inherited from a surrounding job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_command() -> list[str]:
    """The `train` console script of this interpreter's environment (else the module it runs)."""
    script = Path(sys.executable).with_name("train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "paratrain.trainer.cli"]


def compose(overrides: list[str]):
    """The config `train OVERRIDES` would run (hydra.* overrides excluded)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import paratrain.conf
    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs

    register_configs()
    register_recipes()
    with initialize_config_dir(config_dir=paratrain.conf.__path__[0], version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def chosen_variants(parser, text: str, names) -> list[str]:
    """The --variants subset (comma-separated, in the order given); an unknown one is a usage error."""
    chosen = text.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} not among {', '.join(names)}")
    return chosen


def load_note(load_before: float, what: str = "figures are noisy") -> str:
    cores = os.cpu_count() or 1
    busy = load_before > 0.5
    return f"load average (1 min) before the runs: {load_before:.2f} on {cores} cores" + (f"  -- busy machine: {what}" if busy else "")


def free_port() -> int:
    """A free localhost TCP port for a 2-process job's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_worker() -> None:
    """End a worker process: leave its process group (all ranks together), then exit without the
    interpreter's teardown, where gloo can abort after a correct run (DESIGN.md facts)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
