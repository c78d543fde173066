"""Research scripts over the shipped ruleset (run as `python -m research.NAME`; research/README.md)."""
