"""S3 client timeouts come from the settings (a stalled request costs one timeout, then a retry)."""

from __future__ import annotations

from worker.core.settings import Settings
from worker.infra.storage import make_s3_client


def test_s3_timeouts_are_settings() -> None:
    settings = Settings.from_env({"ICHVOL_S3_READ_TIMEOUT_S": "1.5", "ICHVOL_S3_CONNECT_TIMEOUT_S": "0.5"})
    client = make_s3_client(
        settings.replace(s3_endpoint_url="http://127.0.0.1:9", aws_access_key_id="a", aws_secret_access_key="b")
    )
    assert client.meta.config.read_timeout == 1.5 and client.meta.config.connect_timeout == 0.5
    defaults = Settings()
    assert (defaults.s3_read_timeout_s, defaults.s3_connect_timeout_s) == (60.0, 5.0)
