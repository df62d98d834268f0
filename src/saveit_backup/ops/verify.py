"""Re-read every object through its inverse pipeline and check size and checksum."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from saveit_backup.domain.manifest import Manifest, ObjectEntry
from saveit_backup.errors import IntegrityError, SaveitError
from saveit_backup.pipeline import digests
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository


@dataclass
class VerifyReport:
    backup_id: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_object(repo: Repository, backup_id: str, entry: ObjectEntry) -> str | None:
    key = layout.object_key(backup_id, entry.name)
    size = 0
    try:
        h = digests.like(entry.digest)  # an unknown algorithm (RepositoryFormatError) stops verify with its hint
    except IntegrityError as exc:
        return f"{entry.name}: {exc.message}"
    try:
        for chunk in repo.read_object(key):
            h.update(chunk)
            size += len(chunk)
    except SaveitError as exc:
        return f"{entry.name}: {exc.message}"
    if size != entry.size:
        return f"{entry.name}: size {size} differs from manifest {entry.size} (corrupt)"
    if not digests.matches(h, entry.digest):
        return f"{entry.name}: {digests.algorithm_of(entry.digest)} digest differs from manifest (corrupt)"
    return None


def verify_backup(repo: Repository, manifest: Manifest, jobs: int = 2) -> VerifyReport:
    report = VerifyReport(manifest.id)
    if not manifest.checksum_ok:
        report.problems.append("manifest.json: checksum mismatch (manifest damaged)")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for problem in pool.map(lambda e: verify_object(repo, manifest.id, e), manifest.objects):
            report.checked += 1
            if problem:
                report.problems.append(problem)
    return report
