"""Internal: when a step is measured (the optimizer's step hooks, sampling) and the clip it is measured before.

Imports only ``config``: what it takes (a step's norms, a clip's factors) it hands on to ``measure`` through
the step path, and knows nothing of how they are measured.
"""
