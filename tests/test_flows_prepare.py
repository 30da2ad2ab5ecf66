"""The prepare task under a real (temporary) Prefect server: cached by its inputs, and a cached
result whose tensor cache was deleted is recomputed rather than returned stale."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flows_helpers import prefect_harness, tiny_dataset

from cnn.config import TrainConfig


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server; PREFECT_HOME (results, caches) in a temp dir."""
    with prefect_harness(tmp_path_factory.mktemp("prefect_home")):
        yield


@pytest.mark.slow
def test_prepare_is_cached_by_inputs_and_survives_a_deleted_cache(
    harness: None, tmp_path: Path
) -> None:
    from prefect import flow

    from tasks.prepare import prepare_for

    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    cfg = TrainConfig().replace(model="lenet5", dataset="imagefolder", data_dir=str(data))

    @flow
    def prepare_twice() -> list[tuple[str, bool]]:
        return [(str(info.path), cached) for info, cached in (prepare_for(cfg), prepare_for(cfg))]

    (path1, cached1), (path2, cached2) = prepare_twice()
    assert (cached1, cached2) == (False, True) and path1 == path2
    shutil.rmtree(path1)  # the tensor cache goes away; Prefect's record of it does not
    ((path3, cached3), (_, cached4)) = prepare_twice()
    assert path3 == path1 and (Path(path3) / "meta.json").exists()
    assert not cached3 and cached4
