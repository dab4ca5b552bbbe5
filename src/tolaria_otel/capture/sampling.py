"""Which optimizer steps are measured (``TOLARIA_SEED_SAMPLE_EVERY``)."""

from __future__ import annotations


class Sampling:
    """Which optimizer steps are measured: one in every ``sample_every``, the first one included.

    Apart from the step path because the clip asks too: only a clip before a sampled step is taken.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._countdown = 1  # steps until the next sampled one

    def next_is_sampled(self) -> bool:
        return self._countdown == 1

    def count(self) -> bool:
        """Count an optimizer step; True when it is a sampled one."""
        self._countdown -= 1
        if self._countdown:
            return False
        self._countdown = self.every
        return True
