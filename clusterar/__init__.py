"""clusterar: cluster-aware autoregressive image generation (LlamaGen baseline, IAR, CTF)."""

from .errors import ClusterarError

__version__ = "0.1.0"
__all__ = ["ClusterarError", "__version__"]
