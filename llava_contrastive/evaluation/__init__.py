"""Host-agnostic evaluation: the alignment report and figures, downstream benchmarks and scoring."""
