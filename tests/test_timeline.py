"""The actor's GPU-busy arithmetic: the union of tile and export intervals over the engine's span."""
import time

from trtseg.jobs.timeline import GpuTimeline, _union_length


def test_union_counts_overlaps_once_and_clips_to_the_span():
    tiles = [(0.0, 10.0), (12.0, 20.0)]
    exports = [(8.0, 13.0), (25.0, 40.0)]  # one bridges a tile gap, one runs past the span's end
    assert _union_length(tiles + exports, 0.0, 30.0) == 20.0 + 5.0
    assert _union_length(tiles, 0.0, 20.0) == 18.0
    assert _union_length([(5.0, 6.0), (1.0, 2.0)], 0.0, 10.0) == 2.0  # any order
    assert _union_length([(0.0, 4.0), (1.0, 2.0)], 0.0, 10.0) == 4.0  # one inside another
    assert _union_length([], 0.0, 10.0) == 0.0


def test_cpu_timeline_times_only_the_engine():
    t = GpuTimeline(None)
    t0 = time.perf_counter()
    with t.batch("case") as engine:
        time.sleep(0.2)  # the tiles' gather: not engine time
        with engine():
            time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    s = t.summary()
    assert set(s) == {"engine_seconds"}
    assert 0.05 <= s["engine_seconds"] + 0.001 and s["engine_seconds"] <= elapsed - 0.2 + 0.001
