"""Old import path of `clusterar.clusters.inspect` (`clusterar cluster inspect`: the token swap experiment
and plots), kept because the README showed it to users; new code imports from `clusterar.clusters.inspect`."""

from .clusters.inspect import (
    ROWS,
    describe_clusters,
    format_table,
    inspect_clusters,
    plot_sizes_and_projection,
    save_swap_picture,
    swap_experiment,
    swap_tokens,
)

__all__ = [
    "ROWS",
    "describe_clusters",
    "format_table",
    "inspect_clusters",
    "plot_sizes_and_projection",
    "save_swap_picture",
    "swap_experiment",
    "swap_tokens",
]
