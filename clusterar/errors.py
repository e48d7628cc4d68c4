"""The one exception type users see.

Every check on user input (paths, files, arguments, checkpoints) raises `ClusterarError` with a message
that names the thing at fault, says what is wrong and how to fix it. The CLI prints it without a
traceback and exits with status 2; library users can catch it.
"""


class ClusterarError(Exception):
    """A problem with the user's input or files, explained in the message."""
