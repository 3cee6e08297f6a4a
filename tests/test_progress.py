"""Progress lines of a long stage: shards done, rates, and the time left."""

from __future__ import annotations

from facecap.flows.curate import _Progress
from facecap.shards import ShardStats


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    warning = error = info


def stats(cached: bool = False, error: str | None = None) -> ShardStats:
    s = ShardStats(stage="detect", input="shard", source="src", rows_in=10, rows_out=4, error=error)
    s.cached = cached
    return s


def test_time_left_follows_the_rate_of_computed_shards():
    log = Lines()
    progress = _Progress(log, total=10, stage="detect", every_seconds=0.0)
    progress.started -= 30  # 30 s in
    progress.update(stats(cached=True))  # cached shards cost nothing: no estimate from them alone
    assert "left" not in log.lines[-1]
    progress.update(stats())
    progress.update(stats())  # two computed shards in 30 s: 7 more take about 1m45s
    assert "detect: 3/10 shards (1 already done, 0 failed)" in log.lines[-1]
    assert log.lines[-1].endswith("| ~1m45s left"), log.lines[-1]
    for _ in range(7):
        progress.update(stats())
    assert "10/10 shards" in log.lines[-1] and "left" not in log.lines[-1]


def test_lines_are_rate_limited_but_the_first_last_and_failures_always_show():
    log = Lines()
    progress = _Progress(log, total=4, stage="ingest", every_seconds=3600.0)
    progress.update(stats())
    progress.update(stats())
    progress.update(stats(error="OSError: [Errno 28] No space left on device: '/out/x'"))
    progress.update(stats())
    assert [line.split(":")[0] for line in log.lines] == ["ingest", "ingest shard", "ingest"]
    assert "FAILED: OSError" in log.lines[1] and "4/4 shards" in log.lines[-1]
