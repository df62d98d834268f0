"""Block-level diff/incr backups, chain restore and delta restore on a real archiving cluster.

One archiving cluster for the module (pgbench scale 3, data checksums on).  The chain is taken while no
load runs, so the database content at each backup is exactly what a snapshot query sees just before it;
every restore of a chain member (recovery to the backup's consistency point, paused) must show that
content.  The first ``--type incr`` has no reference and must fall back to a full backup and say so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from saveit_backup.ops.incremental import ByteStream, merged
from saveit_backup.pg.cluster import Cluster
from saveit_backup.pipeline import digests
from tests.fixtures.pg import Cli, archiving_cluster, stop_clusters
from tests.fixtures.s3 import S3Server
from tests.integration.test_physical import invariant, pgbench, recovered, stop, wait_archived

pytestmark = pytest.mark.pg

SCALE = 3
SNAPSHOT = ("SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts),"
            " (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers),"
            " (SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM small),"
            " (SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname IN ('dropme', 'newtab')),"
            " (SELECT count(*) FROM pg_class WHERE relname = 'pgbench_tellers' AND relfilenode <> oid)")


def merge_file(entry: dict[str, Any], base: ByteStream, deltas: list[tuple[ByteStream, dict[str, Any]]]) -> list[bytes]:
    """The merged file's runs, as bytes."""
    return [bytes(run) for run in merged(entry, base, deltas)]


@dataclass
class Env:
    cluster: Cluster
    base: Path
    cli: Cli
    where: tuple[str, ...] = ()  # how backups reach the data: --pgdata DIR (local) or --remote
    snapshot: str = SNAPSHOT  # the query whose result stands for the database content at a backup
    backups: dict[str, dict[str, object]] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)


def seed(cluster: Cluster) -> None:
    """Tables besides pgbench's: a small one changed between backups, one to drop."""
    cluster.psql("CREATE TABLE small (id int PRIMARY KEY, v text);"
                 " INSERT INTO small SELECT g, md5(g::text) FROM generate_series(1, 2000) g;"
                 " CREATE TABLE dropme AS SELECT g FROM generate_series(1, 50000) g")


def transactions(c: Cluster, count: int) -> None:
    proc = pgbench(c, "-c", "2", "-t", str(count // 2), "-n")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("incr")
    cluster, _repo, cli = archiving_cluster(base, SCALE)
    seed(cluster)
    yield Env(cluster, base, cli, ("--pgdata", str(cluster.datadir)))
    stop_clusters(base, cluster)


def backup(env: Env, name: str, kind: str, **settings: str) -> dict[str, object]:
    env.states[name] = env.cluster.psql(env.snapshot)
    res = env.cli("--json", "backup", "--type", kind, *env.where, env=settings)
    out: dict[str, object] = json.loads(res.stdout)
    out["_stderr"] = res.stderr
    env.backups[name] = out
    return out


def restore_and_check(env: Env, name: str, *extra: str) -> dict[str, object]:
    target = env.base / f"r_{name}"
    bid = str(env.backups[name]["id"])
    res = env.cli("--json", "restore", bid, *extra, "--target-dir", str(target), "--immediate", "--target-action", "pause",
                  "--start")
    report: dict[str, object] = json.loads(res.stdout)
    r = recovered(env, res.stdout)  # type: ignore[arg-type]
    try:
        assert r.psql(SNAPSHOT) == env.states[name], (name, report)
        invariant(r)
        if name in ("incr", "incr2"):
            assert r.psql("SELECT count(*), sum(g) FROM newtab") == "30000|450015000"
            assert r.psql("SELECT count(*) FROM emptynew") == "0"
        r.psql("SELECT count(*) FROM pgbench_accounts WHERE aid > 0")  # the heap and its index are readable
        assert r.psql("SELECT count(*) FROM small WHERE id BETWEEN 100 AND 200") == "101"
    finally:
        stop(r)
    return report


def test_chain_backup_and_restore(env: Env) -> None:
    c = env.cluster
    # No backup yet: an incr falls back to a full backup and says so.
    full = backup(env, "full", "incr")
    assert full["type"] == "full" and str(full["id"]).endswith("F") and full["parent"] is None
    assert full["options"]["fallback"] == "no reference full backup"  # type: ignore[index]
    assert "took a full backup instead" in str(full["_stderr"])

    transactions(c, 2000)
    c.psql("UPDATE small SET v = 'changed' WHERE id % 50 = 0")
    diff = backup(env, "diff", "diff")
    assert diff["type"] == "diff" and diff["parent"] == full["id"] and str(diff["id"]).endswith("D")
    p = diff["physical"]
    assert isinstance(p, dict) and p["chain"] == [full["id"], diff["id"]] and p["start_wal"] and p["stop_wal"] and p["timeline"] == 1
    kinds = {f["kind"] for f in p["files"]}
    assert kinds == {"full", "incremental"}, kinds
    accounts = c.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    entry = next(f for f in p["files"] if f["path"] == accounts)
    assert entry["kind"] == "incremental" and entry["base"]["backup"] == full["id"]
    # A file repository: changed pages are stored as XOR with the full backup's (read back from it).
    assert 0 < p["incremental"]["pages_xor"] <= p["incremental"]["pages_stored"], p["incremental"]

    transactions(c, 1000)
    c.psql("VACUUM FULL pgbench_tellers")  # a new relfilenode
    c.psql("DROP TABLE dropme")
    c.psql("CREATE TABLE newtab AS SELECT g FROM generate_series(1, 30000) g")
    c.psql("CREATE TABLE emptynew (id int)")  # a new empty file: stored as no bytes at all
    incr = backup(env, "incr", "incr", BACKUP_INCREMENTAL_XOR="off")  # a plain layer between XOR layers
    assert incr["type"] == "incr" and incr["parent"] == diff["id"]
    p = incr["physical"]
    assert isinstance(p, dict) and p["chain"] == [full["id"], diff["id"], incr["id"]]
    assert p["incremental"]["pages_xor"] == 0 < p["incremental"]["pages_stored"], p["incremental"]
    tellers = c.psql("SELECT pg_relation_filepath('pgbench_tellers')")
    assert next(f for f in p["files"] if f["path"] == tellers)["kind"] == "full"  # new file: stored whole
    empty = next(f for f in p["files"] if f["path"] == c.psql("SELECT pg_relation_filepath('emptynew')"))
    assert empty["size"] == 0 and "object" not in empty, empty

    transactions(c, 200)  # a small load: the incr is much smaller than the full
    incr2 = backup(env, "incr2", "incr")
    assert incr2["type"] == "incr" and incr2["parent"] == incr["id"]
    assert int(incr2["stored_bytes"]) < 0.5 * int(full["stored_bytes"]), (incr2["stored_bytes"], full["stored_bytes"])  # type: ignore[call-overload]
    assert int(incr2["plain_bytes"]) < 0.5 * int(full["plain_bytes"])  # type: ignore[call-overload]
    stats = incr2["physical"]["incremental"]  # type: ignore[index]
    assert stats["pages_stored"] < stats["pages_read"] / 4, stats
    assert stats["pages_xor"] > 0, stats  # XOR with pages the previous, plain layer stored

    transactions(c, 100)  # after the chain: restores must not see these
    wait_archived(c)
    for name in ("full", "diff", "incr", "incr2"):
        restore_and_check(env, name)

    expire = json.loads(env.cli("--json", "expire", "--dry-run").stdout)
    kept = {k["id"] for k in expire["keep"]}
    assert {full["id"], diff["id"], incr["id"], incr2["id"]} <= kept, expire


def test_delta_restore_repairs_damage(env: Env) -> None:
    assert "incr2" in env.backups, "needs the chain of test_chain_backup_and_restore"
    target = env.base / "r_incr2"
    c = env.cluster
    accounts = target / c.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    small = target / c.psql("SELECT pg_relation_filepath('small')")
    branches = target / c.psql("SELECT pg_relation_filepath('pgbench_branches')")
    with open(accounts, "r+b") as f:  # damage a page in the middle of the heap
        f.seek(8192 * 5 + 100)
        f.write(b"\xde\xad\xbe\xef" * 64)
    small.unlink()
    (branches.parent / "999999").write_bytes(b"stray")
    report = restore_and_check(env, "incr2", "--delta")
    assert not (branches.parent / "999999").exists()
    assert int(report["unchanged_files"]) > 100, report  # type: ignore[call-overload]
    assert int(report["bytes"]) < int(env.backups["full"]["plain_bytes"]), report  # type: ignore[call-overload]


def test_merge_newest_wins_truncates_and_extends() -> None:
    """Pure: base of 6 blocks; delta 1 truncates to 3 blocks and changes block 1; delta 2 extends to 5 and changes 1 again."""
    import hashlib

    from saveit_backup.ops.incremental import ByteStream, changed_rows, delta_header, delta_trailer

    bs = 16

    def page(tag: int, lsn: int = 1) -> bytes:
        return lsn.to_bytes(8, "little")[4:] + lsn.to_bytes(8, "little")[:4] + bytes([tag]) * (bs - 8)

    def delta(records: list[tuple[int, bytes]]) -> bytes:
        return delta_header(bs) + b"".join(n.to_bytes(4, "big") + p for n, p in records) + delta_trailer()

    base = b"".join(page(i) for i in range(6))
    d1 = delta([(1, page(101))])
    d2 = delta([(1, page(201)), (3, page(203)), (4, page(204))])

    def ref(data: bytes) -> dict[str, object]:  # format 1 (bare hex SHA-256) is still read
        return {"backup": "x", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "length": len(data)}

    def stream(data: bytes, ref: object) -> ByteStream:
        return ByteStream([data], digests.recorded(ref))  # type: ignore[arg-type]

    entry = {"path": "base/1/2", "size": 5 * bs, "block_size": bs, "base": ref(base), "deltas": [ref(d1), ref(d2)]}
    out = merge_file(entry, stream(base, entry["base"]), [(stream(d1, entry["deltas"][0]), entry["deltas"][0]),  # type: ignore[index]
                                                         (stream(d2, entry["deltas"][1]), entry["deltas"][1])])  # type: ignore[index]
    assert b"".join(out) == page(0) + page(201) + page(2) + page(203) + page(204)
    # page selection: changed (LSN >= start), zero LSN, and blocks beyond the reference size
    chunk = page(0, lsn=5) + page(1, lsn=50) + bytes(bs) + page(3, lsn=5)
    assert list(changed_rows(chunk, 0, 3, 10, bs)) == [1, 2, 3]
    assert list(changed_rows(chunk, 8, 3, 10, bs)) == [0, 1, 2, 3]  # all beyond the reference's size


@pytest.mark.parametrize("run_blocks", [128, 2, 1])
def test_merge_applies_xor_layers(run_blocks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure: a version-2 delta holds XOR with the previous layer's page below its reference size and plain
    pages from there on; a plain (version-1) layer in between resets what later XORs apply to.  Runs and
    record batches of 1 and 2 blocks cross every boundary."""

    from saveit_backup.ops import incremental

    monkeypatch.setattr(incremental, "READ_BLOCKS", run_blocks)

    from saveit_backup.errors import IntegrityError
    from saveit_backup.ops.incremental import ByteStream, delta_header, delta_trailer

    def xor_pages(a: bytes, b: bytes) -> bytes:
        return bytes(x ^ y for x, y in zip(a, b, strict=True))

    bs = 16

    def page(tag: int) -> bytes:
        return bytes([tag]) * bs

    def delta(records: list[tuple[int, bytes]], ref_blocks: int | None) -> bytes:
        return delta_header(bs, ref_blocks) + b"".join(n.to_bytes(4, "big") + p for n, p in records) + delta_trailer()

    def ref(data: bytes) -> dict[str, object]:
        return {"backup": "x", "digest": digests.of_bytes(data), "size": len(data), "length": len(data)}

    def merge(size: int, base: bytes, deltas: list[bytes]) -> bytes:
        entry = {"path": "base/1/2", "size": size * bs, "block_size": bs, "base": ref(base), "deltas": [ref(d) for d in deltas]}
        return b"".join(merge_file(entry, ByteStream([base], entry["base"]["digest"]),  # type: ignore[index]
                                   [(ByteStream([d], r["digest"]), r) for d, r in zip(deltas, entry["deltas"], strict=True)]))  # type: ignore[arg-type, index]

    base = page(1) + page(2) + page(3)
    # layer 1 (XOR, reference of 3 blocks): block 0 becomes 11, block 3 is new (plain)
    d1 = delta([(0, xor_pages(page(1), page(11))), (3, page(14))], 3)
    # layer 2 (plain): block 0 becomes 21
    d2 = delta([(0, page(21))], None)
    # layer 3 (XOR, reference of 4 blocks): blocks 0 and 3 change again, block 4 is new
    d3 = delta([(0, xor_pages(page(21), page(31))), (3, xor_pages(page(14), page(34))), (4, page(35))], 4)
    assert merge(4, base, [d1]) == page(11) + page(2) + page(3) + page(14)
    assert merge(4, base, [d1, d2]) == page(21) + page(2) + page(3) + page(14)
    assert merge(5, base, [d1, d2, d3]) == page(31) + page(2) + page(3) + page(34) + page(35)
    # An XOR record is not a page: over another previous layer it gives another page.
    assert merge(5, base, [d1, d3])[:bs] == xor_pages(page(11), xor_pages(page(21), page(31))) != page(31)
    # Damaged deltas are refused: an unknown version, unsorted blocks, a missing end marker, a wrong length.
    for bad, message in ((b"SVBK\x03" + d1[5:], "not a block delta of version"),
                         (delta([(3, page(14)), (0, page(11))], None), "not sorted"),
                         (d2[:-4] + b"\0\0\0\0", "without its end marker"),
                         (d2[:-1], "whole number")):
        with pytest.raises(IntegrityError, match=message):
            merge(4, base, [bad])


def test_xor_delta_of_a_file_that_grows_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure: the file, shorter than the reference (vacuum truncated it), grows right after a short read; the
    following reads must stay aligned with the reference's runs, or XOR records land on the wrong blocks."""
    import hashlib
    import os
    import struct
    import types

    from saveit_backup.ops import incremental as inc

    bs = 8192

    def page(tag: int, lsn: int) -> bytes:
        return struct.pack("<II", lsn >> 32, lsn & 0xFFFFFFFF) + bytes([tag % 256]) * (bs - 8)

    reference = b"".join(page(i, 10) for i in range(300))  # the reference: 300 blocks, none changed since
    ref_entry = {"kind": "full", "backup": "F", "object": "f1", "offset": 0, "size": len(reference),
                 "sha256": hashlib.sha256(reference).hexdigest()}  # written by format 1: the new base records "sha256:..."
    path = tmp_path / "16384"
    pages = [page(i, 10) for i in range(200)]
    pages[5] = page(55, 2000)  # changed since the reference
    path.write_bytes(b"".join(pages))

    real_pread = os.pread
    grown: list[bool] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        if len(data) < n and not grown:  # the table grows right after the short read: new and zeroed pages
            grown.append(True)
            with open(path, "ab") as f:
                f.write(b"".join(bytes(bs) if i % 2 else page(100 + i, 3000) for i in range(200, 400)))
        return data

    monkeypatch.setattr(inc, "os", types.SimpleNamespace(open=os.open, close=os.close, fstat=os.fstat, pread=pread, O_RDONLY=os.O_RDONLY))

    def windows(entry: dict[str, object]) -> Iterator[bytes]:
        run = inc.READ_BLOCKS * bs
        yield from (reference[i : i + run] for i in range(0, len(reference), run))

    reader = types.SimpleNamespace(checks=types.SimpleNamespace(enabled=False), real_path=lambda p: str(path))
    entry = types.SimpleNamespace(path="base/1/16384", mode=0o600, mtime=0, size=0, digest="")
    producer = inc.DeltaProducer(reader, types.SimpleNamespace(start_lsn=1000), "I", bs, 131072, windows)  # type: ignore[arg-type]
    work = inc.IncrementalWork(entry, ref_entry)
    delta = b"".join(producer.produce(work))
    assert grown and work.out["size"] == 400 * bs and producer.stats.pages_xor > 0
    base, last = work.out["base"], work.out["deltas"][-1]
    assert base["digest"] == "sha256:" + ref_entry["sha256"] and last["digest"].startswith("blake3:")
    out = merge_file(work.out, inc.ByteStream([reference], base["digest"]), [(inc.ByteStream([delta], last["digest"]), last)])
    assert b"".join(out) == path.read_bytes()


def test_failed_chain_read_releases_its_storage_permit() -> None:
    """Pure: a reference whose delta cannot be read fails at once and gives its storage permit back (a leaked
    permit per failed file would hang a backup once the workers hold them all)."""
    import threading

    from saveit_backup.errors import IntegrityError
    from saveit_backup.ops import incremental as inc
    from saveit_backup.repo import layout
    from saveit_backup.repo.repository import Repository
    from saveit_backup.storage.memory import MemoryStorage
    from saveit_backup.storage.wrappers import LimitedStorage

    bs = 8192
    limited = LimitedStorage(MemoryStorage(), 3)
    repo = Repository(limited)
    repo.init()
    base = bytes(300 * bs)
    repo.put_object(layout.object_key("F", "f1"), [base])
    delta = inc.delta_header(bs, 300) + b"\0\0\0\0" + bytes(bs) + inc.delta_trailer()
    repo.put_object(layout.object_key("I", "f2"), [delta])
    entry = {"kind": "incremental", "path": "base/1/2", "size": len(base), "block_size": bs, "sha256": "",
             "base": {"backup": "F", "object": "f1", "offset": 0, "size": len(base), "sha256": ""},
             "deltas": [{"backup": "I", "object": "f2", "offset": 0, "length": len(delta) + bs + 4, "sha256": "", "own": True}]}
    errors = []
    for _ in range(3):  # three permits: a leak per failure would leave none
        try:
            for _run in inc.reference_windows(repo, inc.PackCache(repo), entry, threading.Lock(), bs):
                pass
        except IntegrityError as exc:
            errors.append(exc)  # kept alive, as a pool's future keeps it
    assert len(errors) == 3 and "truncated block delta" in str(errors[0])
    assert all(limited._sem.acquire(timeout=2) for _ in range(3)), "a failed read kept its storage permit"


def test_xor_chain_on_s3(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, s3_bucket: str) -> None:
    """Page XOR turned on for an object store: the incrementals read their reference back over S3 (moto on
    127.0.0.1), and the restored chain holds what the database held at the last backup."""
    base = tmp_path_factory.mktemp("incr_s3")
    settings = (f'aws_endpoint_url = "{s3_server.endpoint_url}"\naws_access_key_id = "testing"\n'
                'aws_secret_access_key = "testing"\ns3_path_style = true\nincremental_xor = "on"\n')
    cluster, _repo, cli = archiving_cluster(base, SCALE, config=settings, repository=f"s3://{s3_bucket}/chain")
    try:
        seed(cluster)
        env = Env(cluster, base, Cli(dict(cli.env, BACKUP_CONFIG=str(base / "saveit.toml"))), ("--pgdata", str(cluster.datadir)))
        assert backup(env, "s3full", "full")["type"] == "full"
        transactions(cluster, 1000)
        assert backup(env, "s3incr", "incr")["physical"]["incremental"]["pages_xor"] > 0  # type: ignore[index]
        transactions(cluster, 500)
        cluster.psql("UPDATE small SET v = 'again' WHERE id % 7 = 0")
        last = backup(env, "s3incr2", "incr")
        assert last["physical"]["chain"][0] == env.backups["s3full"]["id"]  # type: ignore[index]
        assert last["physical"]["incremental"]["pages_xor"] > 0  # type: ignore[index]
        wait_archived(cluster)
        restore_and_check(env, "s3incr2")
    finally:
        stop_clusters(base, cluster)
