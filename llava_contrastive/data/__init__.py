"""Data checks before step 1, the runtime guard around a dataset, held-out splits."""
