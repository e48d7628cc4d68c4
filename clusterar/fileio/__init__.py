"""Reading and writing clusterar's files: atomic writes, the one wording of file errors, safetensors files
with JSON metadata, and content fingerprints.

Everything we save is safetensors (weights, optimizer state, token files) with a JSON header, or plain
JSON, and nothing is written in place. One module per concept:

- `atomic`: atomic writes and the removal of killed writers' temporary files; `check_writable`;
- `errors`: `FileError` and the advice for each kind of file (`REMEDIES`, `KIND_NAMES`), `check_file`,
  `expect_kind`;
- `jsonfile`: JSON files written atomically and read with those errors;
- `tensors`: safetensors files (save, load, header, metadata, memory-mapped tensors);
- `fingerprints`: content hashes of tensors.

The names below are the public API. The kill tests' hook is `clusterar.killpoints.kill_point`.
"""

from .atomic import (
    FILE_MODE,
    WRITE_ERRNOS,
    atomic_path,
    check_writable,
    remove_stale_temps,
    write_text_atomic,
)
from .errors import (
    KIND_NAMES,
    REMEDIES,
    FileError,
    check_file,
    describe_kind,
    expect_kind,
    file_error,
    first_line,
    is_symlink_loop,
    remedy,
)
from .fingerprints import fingerprint
from .jsonfile import read_json, write_json
from .tensors import load_tensors, mmap_tensor, read_meta, read_safetensors_header, save_tensors

__all__ = [
    "FILE_MODE",
    "KIND_NAMES",
    "REMEDIES",
    "WRITE_ERRNOS",
    "FileError",
    "atomic_path",
    "check_file",
    "check_writable",
    "describe_kind",
    "expect_kind",
    "file_error",
    "fingerprint",
    "first_line",
    "is_symlink_loop",
    "load_tensors",
    "mmap_tensor",
    "read_json",
    "read_meta",
    "read_safetensors_header",
    "remedy",
    "remove_stale_temps",
    "save_tensors",
    "write_json",
    "write_text_atomic",
]
