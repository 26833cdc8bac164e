"""User-facing errors: a bad config or input, reported in one paragraph with exit status 2."""


class ConfigError(ValueError):
    """A bad config value or input. The message names the key, the value, the rule and the fix.

    `train` prints it without a traceback and exits with status 2 (1 is for crashes).
    """

    exit_code = 2
