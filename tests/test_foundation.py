"""Settings from the environment, the embedded Redis, the shared network."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis
import torch
from pydantic import ValidationError

from app.network import LEGACY_ARCH, build_model
from config.settings import Settings
from worker.cli.redis_embedded import EmbeddedRedis


def test_defaults_match_design() -> None:
    s = Settings(_env_file=None)
    assert s.redis_url is None
    assert s.rq.queue == "digits"
    assert s.digits_events_channel == "digits:events"
    assert s.discord_api_base == "https://discord.com/api/v10"
    assert str(s.data_dir) == "data"
    assert s.handwriting_api_key is None
    assert s.train.limit is None and s.train.noise_prob == 0.0


def test_nested_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RQ__QUEUE", "other")
    monkeypatch.setenv("TRAIN__LIMIT", "500")
    monkeypatch.setenv("TRAIN__NOISE_PROB", "0.05")
    monkeypatch.setenv("API__READ_MAX_BYTES", "4096")
    monkeypatch.setenv("REDIS_URL", "")
    s = Settings(_env_file=None)
    assert (s.rq.queue, s.train.limit, s.train.noise_prob, s.api.read_max_bytes) == ("other", 500, 0.05, 4096)
    assert s.redis_url is None  # blank means unset


@pytest.mark.parametrize(
    ("var", "value"),
    [("TRAIN__LIMIT", "lots"), ("TRAIN__NOISE_PROB", "2"), ("DISCORD_PUBLIC_KEY", "xyz"),
     ("HANDWRITING_API_URL", "ftp://x"), ("API__READ_TIMEOUT_S", "-1")],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)
    assert var.lower().split("__")[-1] in str(info.value).lower()


def test_bad_value_stops_the_api_at_start() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import app.main"],
        env={"TRAIN__LIMIT": "-5", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "limit" in proc.stderr.lower()


def test_embedded_redis_is_real_and_stops() -> None:
    server = EmbeddedRedis().start()
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert client.info("server")["redis_version"]
    client.close()
    server.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()


def test_redis_fixture_gives_a_clean_database(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("left-behind", 1)
    client.close()


def test_legacy_network_shape() -> None:
    model = build_model(LEGACY_ARCH).eval()
    with torch.inference_mode():
        out = model(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
    stem = model.conv1
    assert isinstance(stem, torch.nn.Conv2d)
    assert stem.in_channels == 1 and stem.stride == (1, 1) and stem.kernel_size == (3, 3)
    assert isinstance(model.maxpool, torch.nn.Identity)


# In a fresh process: what spin_while_training says, then the policy torch's OpenMP would load with.
SPIN_PROBE = ("import os, app; spun = app.spin_while_training(); "
              "print(spun, os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'))")


def _probe(env: dict[str, str], code: str = SPIN_PROBE) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_training_threads_spin_and_the_apis_sleep_unless_the_user_chose() -> None:
    """`digits worker`, `digits train` and `make bench-train` call spin_while_training before torch loads;
    the API keeps passive threads; a policy set by the user wins everywhere, and `digits dev` passes only the
    user's on to its API and worker."""
    import app

    ours = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert _probe(ours) == f"True ACTIVE {app.TRAINING_SPIN_COUNT}"
    assert _probe({**ours, "OMP_WAIT_POLICY": "PASSIVE"}) == "False PASSIVE None"
    assert _probe({**ours, "GOMP_SPINCOUNT": "10"}) == "False PASSIVE 10"
    assert _probe(ours, "import os, torch, app; print(app.spin_while_training(), os.environ['OMP_WAIT_POLICY'])") \
        == "False PASSIVE"
    assert _probe(ours, "import os, app; print(os.environ['OMP_WAIT_POLICY'])") == "PASSIVE"  # the API's

    child = "from worker.cli.dev import dev_environment as d; from config.settings import Settings; "
    from_dev = f"{child}import json, os; print(json.dumps(d(dict(os.environ), Settings(_env_file=None), 'x')))"
    passed_on = json.loads(_probe(ours, from_dev))
    assert "OMP_WAIT_POLICY" not in passed_on and _probe({**ours, **passed_on}).startswith("True ACTIVE")
    assert json.loads(_probe({**ours, "OMP_WAIT_POLICY": "PASSIVE"}, from_dev))["OMP_WAIT_POLICY"] == "PASSIVE"
