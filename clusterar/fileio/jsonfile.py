"""JSON files, written atomically and read with the one wording of file errors (a missing, binary,
truncated or invalid file says so, with the advice for its kind)."""

from __future__ import annotations

import json
import os
from typing import Any

from .atomic import write_text_atomic
from .errors import check_file, file_error


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = check_file(path, what, (".json",))
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise file_error(path, what, "is not a text file (binary bytes), so not JSON", damaged=True) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated"):  # it ended inside a value
            raise file_error(path, what, "is truncated (its JSON ends in the middle)", damaged=True) from e
        raise file_error(path, what, f"is not valid JSON ({e})", damaged=True) from e
