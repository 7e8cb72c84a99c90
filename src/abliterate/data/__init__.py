"""Data shipped with the package: prompt sets, refusal markers, the demo model."""
