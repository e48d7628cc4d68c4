"""The one exception type users see.

Every check on user input (paths, files, arguments, checkpoints) raises `ClusterarError` with a message
that names the thing at fault, says what is wrong and how to fix it. The CLI prints it without a
traceback and exits with status 2; library users can catch it.
"""


class ClusterarError(Exception):
    """A problem with the user's input or files, explained in the message."""


def config_from_dict(cls, d: dict, what: str):
    """`cls(**d)` for a config dataclass read from a file, refusing fields it does not have (a file of
    another version or another model) with their names, instead of a TypeError."""
    known = set(cls.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ClusterarError(f"unknown {what} config fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)
