"""Progress bars: bytes, rate and ETA on a terminal; nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def track(self, chunks: Iterable[bytes], description: str, total: int | None = None) -> Iterator[bytes]:
        if not self.enabled:
            yield from chunks
            return
        from tqdm import tqdm

        bar: Any = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                        leave=False, dynamic_ncols=True)
        try:
            for chunk in chunks:
                bar.update(len(chunk))
                yield chunk
        finally:
            bar.close()
