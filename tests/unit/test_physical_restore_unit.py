"""Order in which a physical restore hands objects to its threads."""

from __future__ import annotations

from typing import Any

import pytest

from saveit_backup.ops.physical_restore import FILE_COST_BYTES, _costliest_first

MiB = 1 << 20


def _obj(name: str, *sizes: int) -> tuple[tuple[str, str], list[dict[str, Any]]]:
    return ("B1", name), [{"path": f"{name}/{i}", "size": s, "offset": 0} for i, s in enumerate(sizes)]


@pytest.mark.parametrize("objects, expected", [
    # the biggest file first, then by bytes
    ([_obj("f2", 269 * MiB), _obj("f1", 1024 * MiB), _obj("f3", 45 * MiB)], ["f1", "f2", "f3"]),
    # 650 small files cost more than a 137 MiB file, less than a 269 MiB one
    ([_obj("f4", 137 * MiB), _obj("p1", *[20_000] * 650), _obj("f2", 269 * MiB)], ["f2", "p1", "f4"]),
    # equal cost: by name
    ([_obj("f9", MiB), _obj("f8", MiB)], ["f8", "f9"]),
    # an empty file still costs its creation
    ([_obj("f1", 0), _obj("f2", FILE_COST_BYTES // 2)], ["f2", "f1"]),
])
def test_costliest_objects_start_first(objects: list[Any], expected: list[str]) -> None:
    assert [name for (_, name), _ in sorted(objects, key=_costliest_first)] == expected
