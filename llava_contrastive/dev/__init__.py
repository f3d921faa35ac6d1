"""Development corner: tiny offline assets, benchmarks of the step cost, the settings ablation."""
