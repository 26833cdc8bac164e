"""User-facing errors: a bad config or input, reported in one paragraph with exit status 2."""

import io
import os
import re
import sys


class ConfigError(ValueError):
    """A bad config value or input. The message names the key, the value, the rule and the fix.

    `train` prints it without a traceback and exits with status 2 (1 is for crashes).
    """

    exit_code = 2


# --- errors while Hydra composes (before any of our code runs) -----------------------------------
_real_stderr = None


def hold_stderr() -> None:
    """Collect stderr until release_stderr(): Hydra prints some composition errors as tracebacks."""
    global _real_stderr
    if _real_stderr is None:
        _real_stderr, sys.stderr = sys.stderr, io.StringIO()


def stderr_held() -> bool:
    """True while Hydra is still composing the config (stderr held): a failure now is a config error."""
    return _real_stderr is not None


def release_stderr() -> str:
    """Give stderr back; returns what was held."""
    global _real_stderr
    if _real_stderr is None:
        return ""
    held, sys.stderr, _real_stderr = sys.stderr.getvalue(), _real_stderr, None
    return held


def explain_composition_error(held: str, argv: list[str]) -> str:
    """Hydra's composition errors that mislead, as config errors; anything else as it was.

    An unknown key (Hydra advises `+KEY`, which would only hide the typo), and OmegaConf's bare
    assertion for a key set inside a null node."""
    unknown = explain_override_error(held)
    if unknown:
        return unknown
    inside_moe = [a for a in argv if a.startswith("model.moe.")]
    if "Unexpected type for root: NoneType" not in held or not inside_moe:
        return held
    return (f"Error: {inside_moe[0]} sets a key inside model.moe, but the model is dense (model.moe=null), so there is "
            f"no model.moe to set it in. Pick an MoE model first, e.g. `train model=moe {inside_moe[0]}` or "
            f"`train +recipe=moe_8x {inside_moe[0]}`.\n")


# --- misspelt keys: Hydra's `+` adds any key, and its error without `+` advises adding it ---------
def schema_fields(node_type) -> dict:
    """{field name: the dataclass type of that field, or None} of a schema dataclass."""
    import dataclasses
    import typing

    fields = {}
    for f in dataclasses.fields(node_type):
        hint = typing.get_type_hints(node_type).get(f.name)
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        fields[f.name] = inner[0] if dataclasses.is_dataclass(inner[0]) else None
    return fields


def did_you_mean(full_key: str) -> str:
    """'did you mean model.moe.num_experts?' for model.moe.num_expert (the nearest schema key), or the keys there are."""
    import difflib

    from .schema import RunConfig

    node, known, parts = RunConfig, [], full_key.lstrip("+~").split(".")
    for i, part in enumerate(parts):
        fields = schema_fields(node) if node is not None else {}
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            if not close:
                prefix = ".".join(known)
                return f"{prefix or 'the config'} has the keys {', '.join(fields)}." if fields else ""
            return f"did you mean {'.'.join([*known, close[0], *parts[i + 1:]])}?"
        known.append(part)
        node = fields[part]
    return ""


def unknown_key_error(full_key: str) -> str:
    parent = full_key.rpartition(".")[0] or "the config"
    return (f"{full_key} is not a config key: {parent} has no key {full_key.rpartition('.')[2]!r}, and a value set there "
            f"would be ignored (a `+` adds a key without checking its name): {did_you_mean(full_key)} Fix the name; "
            f"trainer/schema.py documents every key, and `train --cfg job` prints the composed config.")


def explain_override_error(held: str) -> str | None:
    """Hydra's "Could not override 'KEY'. To append to your config use +KEY=..." as our unknown-key paragraph."""
    found = re.search(r"Could not override '([^']+)'\.\s*\nTo append to your config use \+", held)
    if not found or not re.search(r"Key '[^']+' not in '", held):
        return None
    return f"Error: {unknown_key_error(found.group(1))}\n"


def full_error() -> bool:
    """HYDRA_FULL_ERROR=1: the user asked for tracebacks (the exit status stays 2 for a config error)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


# An override whose value starts with `~` (the shell removed the quotes around '~/corpus/**/*.txt').
_HOME_VALUE = re.compile(r"^(\+{0,2}[A-Za-z_][\w.\-/@]*)=(~[^'\"\s,\[\]{}()=]*)$")


def quote_home_paths(argv: list[str]) -> list[str]:
    """`data.path=~/corpus/**/*.txt` as Hydra can read it: its override grammar rejects a bare `~`."""
    return [f"{m.group(1)}='{m.group(2)}'" if (m := _HOME_VALUE.match(a)) else a for a in argv]
