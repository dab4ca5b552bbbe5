"""Internal: the device work of a sampled step: the seeds and their layers, one foreach norm, running statistics.

Imports ``config`` and ``capture``'s types; no host sync.
"""
