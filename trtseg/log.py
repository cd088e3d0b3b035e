"""Log lines and progress, one implementation for every path.

Log lines go through the standard library's logging ("trtseg" logger, stderr) with one of two formatters: text
(``HH:MM:SS message key=value ...``) or, with --log-json, one JSON object a line (ts, level, msg and the fields), so
a cluster's log collector can parse them. Progress is tqdm's bar on a terminal (cases done/total, tiles/s, ETA);
in a log (no terminal) it is one log line per finished case with the same figures.
"""
from __future__ import annotations

import json
import logging
import sys
import time

log = logging.getLogger("trtseg")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return f"{self.formatTime(record, '%H:%M:%S')} {record.getMessage()} {fields}".rstrip()


def setup_logging(as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def event(msg: str, **fields) -> None:
    """One log line: a message and its key=value fields."""
    log.info(msg, extra={"fields": fields})


class Progress:
    """Cases done/total, tiles/s and ETA: tqdm's bar on a terminal, one log line per finished case otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.tiles, self.t0 = total, 0, 0, time.perf_counter()
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, cases: int = 0, tiles: int = 0) -> None:
        self.done += cases
        self.tiles += tiles
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tiles / elapsed:.1f} tiles/s", refresh=False)
            self.bar.update(cases)
        elif self.enabled and cases:
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            event(f"[{self.done}/{self.total} cases]", tiles_per_s=round(self.tiles / elapsed, 1),
                  elapsed_s=round(elapsed), eta_s=round(eta) if eta == eta else None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
