"""Evaluation of expert-selection policies on WIDE-Decode-v0: runner, metrics, plots and the ``wide-eval`` CLI."""

from eval.runner import (
    EvaluationResult,
    MetricHook,
    PolicyResult,
    SweepResult,
    evaluate_policies,
    run_sweep,
)

__all__ = ["EvaluationResult", "MetricHook", "PolicyResult", "SweepResult", "evaluate_policies", "run_sweep"]
