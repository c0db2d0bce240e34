"""Plots (matplotlib, Agg backend) of experiment results: each takes a result object and a path."""
