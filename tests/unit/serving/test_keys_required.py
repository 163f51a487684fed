"""`churn serve` needs API keys, or an explicit CHURN_API_OPEN=true."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.settings import load_settings
from serving.main import require_keys


def test_no_keys_refuses_to_serve_unless_opened_on_purpose() -> None:
    with pytest.raises(ConfigError, match="CHURN_API_OPEN=true"):
        require_keys(load_settings(api_keys=[]))
    require_keys(load_settings(api_keys=[], api_open=True))
    require_keys(load_settings(api_keys=["k"]))
