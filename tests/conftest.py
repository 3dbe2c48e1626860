import os

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

# Parallel workers (pytest-xdist, `make test` runs two) each get a lab of their own: the lab name carries the
# worker's id, so one worker's tests never see, or tear down, the other's containers. Set before `lab` is
# imported (its default name is read from the environment then).
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    os.environ["QRMFS_LAB_NAME"] = f"{os.environ.get('QRMFS_LAB_NAME') or 'qrmfs-lab'}-{_worker}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that boot QEMU guests first, most boots first: with the workers' files handed out in this
    order, the long boot files start at once on different workers instead of ending the run on one."""
    def file(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    boots: dict[str, int] = {}
    for item in items:
        boots[file(item)] = boots.get(file(item), 0) + bool(item.get_closest_marker("boot"))
    items.sort(key=lambda item: -boots[file(item)])
