"""Internal: the epoch end: the segments' statistics in one vector, one host copy, or the ranks' all-reduce."""
