"""An inference actor's GPU time, read from CUDA events: nothing is synchronized per batch to measure it.

Per tile batch, four events on the tile stream: work start (before the tiles are gathered), engine start, engine
end, and work end (after the batch's logits are added to the case's sum). Per export, two events on the export
stream: when it may start (after the tile stream's work for the case) and when the mask is made, before it is
copied to the host. Times are read once the events have passed, so the GPU always keeps its queue.

- engine_seconds: time inside the engine (all mirrorings).
- gap_seconds: GPU time from one engine call's end to the next one's start, by where the next call stands: the
  first batch of a case, of a chunk (a Ray call), or any other batch.
- case_gap_seconds: the "case" gaps split at the event recorded when the host entered the case's first call:
  "stream_dry", the tile stream had finished everything queued before the host got there; "after_entry", from
  there to the engine's start (the case's set-up: its volume's copy, its sum's allocation, the first tiles).
- span: from the first engine call's start to the last one's end.
- gpu_busy_in_span: the share of the span in which the actor's GPU work ran on either stream: tile batches
  (gather, engine, accumulation) and exports (resampling, argmax), copies to the host left out.

On a CPU actor only engine_seconds is kept (wall time).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque

import torch


def _union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of [a, b] intervals, clipped to [lo, hi]."""
    total, end = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


class GpuTimeline:
    def __init__(self, stream: torch.cuda.Stream | None):
        self.stream = stream  # None: a CPU actor
        self.engine_seconds = 0.0
        self.gap_seconds = {"case": 0.0, "chunk": 0.0, "batch": 0.0}
        self.case_gap_seconds = {"stream_dry": 0.0, "after_entry": 0.0}
        self._batches: deque = deque()  # (kind, entry, work start, engine start, engine end, work end) not yet read
        self._ref: torch.cuda.Event | None = None  # the first event: times are ms after it
        self._first_start: float | None = None
        self._prev_end: torch.cuda.Event | None = None
        self._prev_end_ms: float | None = None
        self._tile_busy: list[list[float]] = []  # [start, end] ms, touching batches merged
        self._exports: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def mark(self, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event | None:
        """An event recorded now on ``stream`` (the tile stream by default); None on a CPU actor."""
        stream = stream or self.stream
        if stream is None:
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record(stream)
        if self._ref is None:
            self._ref = e
        return e

    @contextlib.contextmanager
    def batch(self, kind: str, entry: torch.cuda.Event | None = None):
        """Wraps one tile batch's GPU work; yields a context manager that wraps its engine call.
        kind: "case", "chunk" or "batch" (see gap_seconds); entry: the host-entry event of a case's first call."""
        marks: dict = {}

        @contextlib.contextmanager
        def engine():
            t = time.perf_counter()
            marks["start"] = self.mark()
            yield
            marks["end"] = self.mark()
            if self.stream is None:
                self.engine_seconds += time.perf_counter() - t

        w0 = self.mark()
        yield engine
        if self.stream is not None:
            self._batches.append((kind, entry, w0, marks["start"], marks["end"], self.mark()))

    def collect(self, wait: bool = False) -> None:
        """Reads the batches whose events have passed (all of them, waiting, with ``wait``)."""
        while self._batches and (wait or self._batches[0][-1].query()):
            kind, entry, w0, start, end, w1 = self._batches.popleft()
            w1.synchronize()
            ref = self._ref
            assert ref is not None
            self.engine_seconds += start.elapsed_time(end) / 1000
            if self._prev_end is not None:
                self.gap_seconds[kind] += self._prev_end.elapsed_time(start) / 1000
                if entry is not None:
                    self.case_gap_seconds["stream_dry"] += self._prev_end.elapsed_time(entry) / 1000
                    self.case_gap_seconds["after_entry"] += entry.elapsed_time(start) / 1000
            if self._first_start is None:
                self._first_start = ref.elapsed_time(start)
            self._prev_end, self._prev_end_ms = end, ref.elapsed_time(end)
            a, b = ref.elapsed_time(w0), ref.elapsed_time(w1)
            if self._tile_busy and a <= self._tile_busy[-1][1]:
                self._tile_busy[-1][1] = max(b, self._tile_busy[-1][1])
            else:
                self._tile_busy.append([a, b])

    def export_started(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        return self.mark(stream)

    def export_done(self, started: torch.cuda.Event | None, stream: torch.cuda.Stream | None) -> None:
        if started is not None:
            self._exports.append((started, self.mark(stream)))

    def summary(self) -> dict:
        """Reads everything (waiting for the GPU) and returns the times above."""
        self.collect(wait=True)
        out: dict = {"engine_seconds": round(self.engine_seconds, 3)}
        if self._first_start is None or self._prev_end_ms is None or self._ref is None:
            return out
        ref = self._ref
        lo, hi = self._first_start, self._prev_end_ms
        span_ms = hi - lo
        if span_ms <= 0:
            return out
        for _, end in self._exports:
            end.synchronize()
        exports = [(ref.elapsed_time(a), ref.elapsed_time(b)) for a, b in self._exports]
        busy = _union_length([(a, b) for a, b in self._tile_busy] + exports, lo, hi)
        out.update({
            "span_seconds": round(span_ms / 1000, 3),
            "engine_busy_in_span": round(self.engine_seconds * 1000 / span_ms, 4),
            "gpu_busy_in_span": round(busy / span_ms, 4),
            "tile_work_in_span": round(_union_length([(a, b) for a, b in self._tile_busy], lo, hi) / span_ms, 4),
            "gap_seconds": {k: round(v, 3) for k, v in self.gap_seconds.items()},
            "case_gap_seconds": {k: round(v, 3) for k, v in self.case_gap_seconds.items()},
        })
        return out
