"""What the job prints: one `[raydistill]` line per event, flushed at once (`ray job logs
--follow` shows it as it happens)."""

from __future__ import annotations


def log(msg: str) -> None:
    print(f"[raydistill] {msg}", flush=True)
