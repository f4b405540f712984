"""The one exception type for mistakes a user can fix; entry points print it as a single line."""


class DifflabError(Exception):
    """A user-fixable problem (bad path, bad value, missing file). The message says what and how to fix."""

    def __str__(self) -> str:
        text = super().__str__()
        # torch's DataLoader re-raises a worker's error as the same type with the worker's traceback
        # in front ("Caught DifflabError in DataLoader worker ... Original Traceback"): the message
        # is the traceback's last line.
        if text.startswith("Caught DifflabError") and "Original Traceback" in text:
            return text.rstrip().splitlines()[-1].split("DifflabError: ", 1)[-1]
        return text
