"""Check a Kubernetes manifest against the openAPIV3Schema of its CRD, offline.

    python infra/k8s/check_crd.py infra/k8s/trainjob.yaml trainer.kubeflow.org_trainjobs.yaml

The CRD files are not in this repository (they are Kubeflow's): take them from a Kubeflow
Trainer release, e.g. `manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml` of v2.3.0 and
`manifests/base/crds/kubeflow.org_pytorchjobs.yaml` of v1.9.0 (github.com/kubeflow/trainer).
Unknown fields are reported as errors (the API server would silently prune them), so a typo or
a field that a version removed (elasticPolicy in Trainer v2) shows up. Exit status 1 on errors.
"""

from __future__ import annotations

import sys
from typing import Any

import jsonschema
import yaml


def _no_unknown_fields(node: Any) -> None:
    """Structural schemas prune unknown fields; make them validation errors instead."""
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            _no_unknown_fields(value)
    elif isinstance(node, list):
        for value in node:
            _no_unknown_fields(value)


def check(manifest_path: str, crd_path: str) -> list[str]:
    """Validation errors of the manifest (one line each); [] when it fits."""
    with open(manifest_path) as f:
        doc = yaml.safe_load(f)
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    if crd["spec"]["names"]["kind"] != doc["kind"]:
        return [f"{crd_path} defines {crd['spec']['names']['kind']}, not {doc['kind']}"]
    version = doc["apiVersion"].split("/")[-1]
    found = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not found:
        return [f"{crd_path} has no version {version} of {doc['kind']}"]
    schema = found[0]["schema"]["openAPIV3Schema"]
    _no_unknown_fields(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the server
    errors = jsonschema.Draft7Validator(schema).iter_errors(doc)
    return [
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}"
        for e in sorted(errors, key=lambda e: [str(p) for p in e.path])
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    errors = check(*argv)
    for line in errors:
        print(f"{argv[0]}: {line}")
    print(f"{argv[0]}: {len(errors)} error(s) against {argv[1]}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
