"""User-facing errors: a bad config or input, reported in one paragraph with exit status 2."""

import io
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
    """OmegaConf's bare assertion for a key set inside a null node, as a config error; anything else as it was."""
    inside_moe = [a for a in argv if a.startswith("model.moe.")]
    if "Unexpected type for root: NoneType" not in held or not inside_moe:
        return held
    return (f"Error: {inside_moe[0]} sets a key inside model.moe, but the model is dense (model.moe=null), so there is "
            f"no model.moe to set it in. Pick an MoE model first, e.g. `train model=moe {inside_moe[0]}` or "
            f"`train +recipe=moe_8x {inside_moe[0]}`.\n")
