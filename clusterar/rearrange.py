"""Old import path of `clusterar.clusters.rearrange` (rearranged tokenizers and token files), kept because
the README showed it to users; new code imports from `clusterar.clusters.rearrange`."""

from .clusters.rearrange import (
    export_iar_mapping,
    permutation_info,
    rearrange_token_file,
    rearrange_token_files,
    rearrange_tokenizer_file,
    rearranged_tokenizer,
)

__all__ = [
    "export_iar_mapping",
    "permutation_info",
    "rearrange_token_file",
    "rearrange_token_files",
    "rearrange_tokenizer_file",
    "rearranged_tokenizer",
]
