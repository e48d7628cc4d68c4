"""Sizes that cannot fit in any machine, in one place: the command line refuses them when a flag is parsed
(`cli.flags`), the library and the spec checker when they are given in Python or in a spec, each saying
what would fit, instead of an allocation error or a run that never ends. Torch-free, so that parsing a
command line imports nothing heavy.

Each limit is (the largest value, the unit and why), the reason read after "takes at most N".
"""

from __future__ import annotations

__all__ = ["Limit", "CODEBOOK", "EPOCHS", "IMAGE_SIDE", "IMAGES", "STEPS", "THREADS", "WORKERS"]

from dataclasses import dataclass

from .errors import ClusterarError


@dataclass(frozen=True)
class Limit:
    high: float
    why: str  # read after the number: " images (the protocol's 50,000 is 0.5% of it)"

    def said(self) -> str:
        """'takes at most 10,000,000 images (...)'."""
        return f"takes at most {self.high:,}{self.why}"

    def check(self, value: float, name: str) -> None:
        """Refuse `value` above the limit, naming `name` (a flag, or a spec key with its table)."""
        if value > self.high:
            raise ClusterarError(f"{name} {self.said()}, got {value:,}")


THREADS = Limit(1024, " (more threads than any machine has cores)")
WORKERS = Limit(256, " (each worker is a process holding a dataset copy)")
IMAGE_SIDE = Limit(4096, " pixels (LlamaGen's models use 256 to 512)")
CODEBOOK = Limit(2**20, " codes (LlamaGen's largest codebook has 16,384)")
IMAGES = Limit(10_000_000, " images (the protocol's 50,000 is 0.5% of it)")
EPOCHS = Limit(1_000_000, " epochs")
STEPS = Limit(10**9, " steps")
