"""MLANE_JOB_INTERVALS: seconds between runs of the jobs it names, the others kept."""

from __future__ import annotations

from typing import Any

import pytest

from core.config import Config, ConfigError


def test_job_intervals_are_read_from_the_environment() -> None:
    config = Config.from_env({"MLANE_JOB_INTERVALS": "overage=120, notices=3600"})
    assert config.job_intervals == (("overage", 120), ("notices", 3600))
    assert Config.from_env({}).job_intervals == ()


@pytest.mark.parametrize("bad", ["overage", "overage=0", "overage=1.5", "overage=-3",
                                 "Overage=5", "overage=999999999"])
def test_a_malformed_job_interval_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="MLANE_JOB_INTERVALS"):
        Config.from_env({"MLANE_JOB_INTERVALS": bad})


def test_an_interval_for_a_job_that_does_not_exist_is_refused() -> None:
    from app import JOB_INTERVALS, scheduled_jobs

    none: Any = None
    services = dict(events=none, notices=none, accrual=none, overage=none, finance=none,
                    limits=none, ledger=none, idempotency=none)
    jobs = scheduled_jobs(Config(job_intervals=(("credits", 5),)), **services)
    assert {j.name: j.interval_seconds for j in jobs} == {**JOB_INTERVALS, "credits": 5}
    with pytest.raises(ConfigError, match="names no job"):
        scheduled_jobs(Config(job_intervals=(("overages", 5),)), **services)
