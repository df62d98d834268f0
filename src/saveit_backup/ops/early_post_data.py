"""Build a table's indexes while the next tables load, as ``pg_restore -j`` does.

The split COPY loader (``ops.copy_loader``) loads every table before the post-data section runs, so a big
table's primary key is built only after the last table loaded, with the other CPU idle once the smaller
indexes are done.  ``EarlyPostData`` runs, as soon as a table's data is committed, the post-data items that
concern that table alone (an INDEX or CONSTRAINT whose only dependencies are tables already loaded), one
``pg_restore -L`` at a time over the archive's table of contents, while the loader goes on with the next
tables.  Everything else (foreign keys, triggers, items depending on other post-data items) stays in the
final ``pg_restore -j`` of the post-data section.

Contract:
* ``table_loaded`` only queues (it is called from the loader's thread); one runner thread starts the batches;
* ``stop`` starts no more batches and returns the dump IDs restored early and those of the batch under way,
  which the final post-data list must leave out (the final run may start at once unless one of its items
  depends on the batch under way); ``join`` waits for that batch and raises a failed batch's error
  (``PgToolError``); ``finish`` is both;
* ``early_items`` is the pure choice, tested on tables of entries.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from saveit_backup.pg.custom_archive import SECTION_POST_DATA, TocEntry

log = logging.getLogger(__name__)

EARLY_KINDS = frozenset({"INDEX", "CONSTRAINT"})  # not FK CONSTRAINT: it needs the referenced table's key too
_STOP = ("", "")


def early_items(entries: Mapping[int, TocEntry], selected: Iterable[int], loaded_tables: set[int]) -> list[int]:
    """The selected post-data INDEX/CONSTRAINT entries whose dependencies are all TABLE entries in
    ``loaded_tables``, in dump ID order."""
    ready = []
    for dump_id in selected:
        e = entries.get(dump_id)
        if e is None or e.section != SECTION_POST_DATA or e.desc not in EARLY_KINDS or not e.deps:
            continue
        if all(dep in loaded_tables and entries[dep].desc == "TABLE" for dep in e.deps):
            ready.append(dump_id)
    return sorted(ready)


def table_of_data(entries: Mapping[int, TocEntry]) -> dict[tuple[str, str], int]:
    """(schema, name) of each TABLE DATA entry -> the dump ID of its TABLE."""
    tables = {}
    for e in entries.values():
        if e.desc == "TABLE DATA" and len(e.deps) == 1 and e.deps[0] in entries and entries[e.deps[0]].desc == "TABLE":
            tables[(e.namespace, e.tag)] = e.deps[0]
    return tables


class EarlyPostData:
    """Runs ``run(list_path)`` (a ``pg_restore -L list_path`` of the archive) for each batch of early items."""

    def __init__(self, entries: Mapping[int, TocEntry], listing: Mapping[int, bytes], workdir: Path,
                 run: Callable[[Path], None]) -> None:
        self.entries = entries
        self.listing = listing  # dump ID -> its ``pg_restore -l`` line, for the selected non-TABLE DATA items
        self.workdir = workdir
        self.run = run
        self.tables = table_of_data(entries)
        self.loaded: set[int] = set()
        self.done: set[int] = set()
        self.running: set[int] = set()  # the batch under way
        self.lock = threading.Lock()  # done, running and stopping change together
        self.error: BaseException | None = None
        self.stopping = False
        self.inbox: queue.Queue[tuple[str, str]] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="early-post-data", daemon=True)
        self.thread.start()

    def table_loaded(self, key: tuple[str, str]) -> None:
        self.inbox.put(key)

    def _work(self) -> None:
        batch = 0
        while (key := self.inbox.get()) != _STOP:
            if self.stopping or self.error is not None:
                continue
            table = self.tables.get(key)
            if table is None:
                continue
            self.loaded.add(table)
            with self.lock:
                if self.stopping:
                    continue
                items = [i for i in early_items(self.entries, self.listing, self.loaded) if i not in self.done]
                if not items:
                    continue
                self.running = set(items)
            batch += 1
            path = self.workdir / f"early-{batch}.list"
            path.write_bytes(b"".join(self.listing[i] + b"\n" for i in items))
            try:
                self.run(path)
            except BaseException as exc:
                with self.lock:
                    self.error, self.running = exc, set()
                continue
            with self.lock:  # together: stop() sees the items either running or done
                self.done.update(items)
                self.running = set()
            log.debug("post-data items %s restored after %s.%s loaded", items, *key)

    def stop(self) -> tuple[set[int], set[int]]:
        """Start no more batches; (items restored, items of the batch under way)."""
        with self.lock:
            self.stopping = True
            self.inbox.put(_STOP)
            return set(self.done), set(self.running)

    def join(self) -> None:
        """Wait for the batch under way; raise its failure (or an earlier one)."""
        self.thread.join()
        if self.error is not None:
            raise self.error

    def finish(self) -> set[int]:
        done, running = self.stop()
        self.join()
        return done | running
