"""The one exception type for problems a user can cause (bad file, bad flag, bad prompt).

The CLI turns it into a one-line message and exit code 2; anything else is a programming error
and keeps its traceback.
"""


class ForethoughtError(Exception):
    """A problem with the user's input: a missing or corrupt file, an unsupported model, a bad value."""
