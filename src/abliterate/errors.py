"""The one exception type that means "the user can fix this"."""


class UserError(Exception):
    """A problem with the user's input or environment, shown as one line without a traceback.

    The message names the problem and, where there is one, the fix.
    """

    exit_code = 1


class SettingsError(UserError):
    """A bad option or config value (exit code 2, like argparse)."""

    exit_code = 2
