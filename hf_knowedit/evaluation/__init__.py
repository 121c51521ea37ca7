"""Evaluating editing methods: the harness (single, batch, sequential editing), per-case records, summaries, reports."""

from .harness import (
    EvaluationSettings,
    EvaluationSettingsError,
    load_summary,
    mean_ci,
    parse_schedule,
    refresh_intervals,
    run_evaluation,
    summarize,
    wilson_interval,
)
from .probes import METRICS, score_cases
from .report import markdown_tables, write_report


__all__ = [
    "METRICS",
    "EvaluationSettings",
    "EvaluationSettingsError",
    "load_summary",
    "markdown_tables",
    "mean_ci",
    "parse_schedule",
    "refresh_intervals",
    "run_evaluation",
    "score_cases",
    "summarize",
    "wilson_interval",
    "write_report",
]
