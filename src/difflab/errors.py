"""The one exception type for mistakes a user can fix; entry points print it as a single line."""


class DifflabError(Exception):
    """A user-fixable problem (bad path, bad value, missing file). The message says what and how to fix."""
