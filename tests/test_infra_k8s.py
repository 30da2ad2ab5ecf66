"""infra/k8s: the Kubeflow Trainer v2 TrainJob and the v1 PyTorchJob examples.

Both are checked against their published CRD schemas when a copy is at hand:
CNNPIPE_CRD_DIR holds `trainer.kubeflow.org_trainjobs.yaml` (Trainer v2.2+) and
`kubeflow.org_pytorchjobs.yaml` (Training Operator v1.9); see infra/README.md. Without it only
the offline checks run (the CRDs are Kubeflow's files, not vendored here).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[1] / "infra" / "k8s"
sys.path.insert(0, str(K8S))
from check_crd import check  # noqa: E402

CRDS = {
    "trainjob.yaml": "trainer.kubeflow.org_trainjobs.yaml",
    "pytorchjob.yaml": "kubeflow.org_pytorchjobs.yaml",
}


def test_trainjob_runs_the_engine_with_the_runtime_variables() -> None:
    job = yaml.safe_load((K8S / "trainjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert "elasticPolicy" not in yaml.safe_dump(job)  # removed in Trainer v2.2
    command = " ".join(job["spec"]["trainer"]["args"])
    for var in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT"):  # fmt: skip
        assert f'"${var}"' in command, var
    assert "-m cnn.train --config /config/run.yaml" in command


def test_v1_example_says_it_is_for_older_clusters() -> None:
    text = (K8S / "pytorchjob.yaml").read_text()
    assert text.startswith("# FOR OLDER CLUSTERS") and "trainjob.yaml" in text.split("\n\n")[0]


def test_checker_reports_unknown_fields(tmp_path: Path) -> None:
    """The offline checker itself, on a tiny CRD: a typo is an error, not silently pruned."""
    crd = {
        "spec": {
            "names": {"kind": "Thing"},
            "versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                               "metadata": {"type": "object"},
                               "spec": {"type": "object",
                                        "properties": {"replicas": {"type": "integer"}}}},
            }}}],
        }
    }  # fmt: skip
    (tmp_path / "crd.yaml").write_text(yaml.safe_dump(crd))
    good = {"apiVersion": "x/v1", "kind": "Thing", "spec": {"replicas": 2}}
    bad = {"apiVersion": "x/v1", "kind": "Thing", "spec": {"replica": 2}}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert check(str(tmp_path / "good.yaml"), str(tmp_path / "crd.yaml")) == []
    (error,) = check(str(tmp_path / "bad.yaml"), str(tmp_path / "crd.yaml"))
    assert "'replica' was unexpected" in error


@pytest.mark.parametrize("manifest", sorted(CRDS))
def test_manifests_fit_the_published_crds(manifest: str) -> None:
    crd_dir = os.environ.get("CNNPIPE_CRD_DIR")
    if not crd_dir or not (Path(crd_dir) / CRDS[manifest]).is_file():
        pytest.skip(f"no {CRDS[manifest]} in $CNNPIPE_CRD_DIR (Kubeflow's file; see infra/README)")
    assert check(str(K8S / manifest), str(Path(crd_dir) / CRDS[manifest])) == []
