"""Hyperparameter sweeps and the paper's ablations with Ray Tune, each trial a Ray Train run."""

from hdm_platform.tune.driver import SweepOutcome, max_concurrent_trials, run_sweep, run_trial
from hdm_platform.tune.space import SearchSpace, load_space

__all__ = ["SearchSpace", "SweepOutcome", "load_space", "max_concurrent_trials", "run_sweep", "run_trial"]
