"""Shared pieces of the churn scorer: settings, errors, the clock and the `churn` CLI.

Importing this package (every `churn` command does, first) drops the prometheus-client
multiprocess folder a parent process's Feast import left in the environment: `feast.metrics`
sets `PROMETHEUS_MULTIPROC_DIR` to a folder of its own when imported, a `churn` process started
by such a parent (`churn demo`, the integration tests) inherits it, and prometheus-client,
which reads it once at its import, would keep that process's metric values in files in the
parent's folder (which the parent's Feast deletes when it exits) instead of in memory. Only the
workers of `churn serve` share a folder, which it names in `CHURN_API_METRICS_FOLDER`
(`monitoring.multiprocess`); theirs stays. Once prometheus-client is imported (a process that
imported Feast or prometheus-client before this package) the variable no longer matters to it,
and it is left alone.
"""

import os
import sys

if "prometheus_client" not in sys.modules and "CHURN_API_METRICS_FOLDER" not in os.environ:
    for _name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        os.environ.pop(_name, None)
