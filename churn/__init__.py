"""Shared pieces of the churn scorer: settings, errors, the clock and the `churn` CLI."""
