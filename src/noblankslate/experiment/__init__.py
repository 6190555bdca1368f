"""Experiments over Table 1's rows: ``run_experiment`` (and ``nbs experiment``) trains every row on one
base config for several seeds and writes a paired table and a figure (docs/table1.md)."""

from noblankslate.experiment.experiment import ExperimentOutputs, run_experiment
from noblankslate.experiment.rows import ROWS, Row, parse_rows, parse_seeds
from noblankslate.experiment.runner import ExperimentError

__all__ = ["ROWS", "ExperimentError", "ExperimentOutputs", "Row", "parse_rows", "parse_seeds", "run_experiment"]
