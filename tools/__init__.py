"""Tools around vgpo.py: benchmarks, experiments and the notebook runner (run as `python -m tools.NAME`)."""
