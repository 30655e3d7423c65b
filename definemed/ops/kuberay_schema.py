"""Validate KubeRay manifests against KubeRay's own CRD schemas (the openAPIV3Schema the API server enforces).

The schemas are vendored from a KubeRay release into infra/kuberay-crds/<version>/ (see SOURCE.json there), so the
check runs offline. Like `kubectl apply` with its default strict field validation, fields that the schema does not
declare are errors (a typo such as `rayStartParam` would otherwise be dropped silently by the API server).

    python -m definemed.ops.kuberay_schema infra/k8s/*.yaml               # validate
    python -m definemed.ops.kuberay_schema --vendor <kuberay checkout> v1.7.0  # refresh the vendored schemas
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "infra" / "kuberay-crds"
VERSION = "v1.7.0"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
API_VERSION = "ray.io/v1"


def _strict(node: Any) -> Any:
    """Unknown fields are errors wherever the schema lists properties and does not preserve unknown fields."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@lru_cache(maxsize=None)
def schema(kind: str, version: str = VERSION) -> dict[str, Any]:
    path = CRD_DIR / version / f"ray.io_{KINDS[kind]}.v1.json"
    s = _strict(json.loads(path.read_text(encoding="utf-8")))
    s["properties"]["apiVersion"] = {"const": API_VERSION}
    s["properties"]["kind"] = {"const": kind}
    s["required"] = sorted(set(s.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return s


def errors(doc: dict[str, Any], version: str = VERSION) -> list[str]:
    """Every schema violation of one manifest, as 'path: message' lines (empty: valid)."""
    from jsonschema import Draft7Validator

    kind = doc.get("kind")
    if kind not in KINDS:
        return [f"kind: {kind!r} is not a KubeRay kind ({', '.join(KINDS)})"]
    v = Draft7Validator(schema(kind, version))
    out = []
    for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        out.append(f"{where}: {e.message[:300]}")
    return out


def documents(path: str | Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")):
        if doc:
            yield doc


def vendor(kuberay_repo: str | Path, version: str) -> Path:
    """Write the v1 openAPIV3Schema of each KubeRay CRD at git tag `version` of a kuberay checkout."""
    repo = Path(kuberay_repo)
    git = ["git", f"--git-dir={repo}" if repo.name.endswith((".git", "repo")) else f"--git-dir={repo / '.git'}"]
    commit = subprocess.run([*git, "rev-parse", f"{version}^{{commit}}"], check=True, capture_output=True,
                            text=True).stdout.strip()
    out = CRD_DIR / version
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, plural in KINDS.items():
        src = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        crd = yaml.safe_load(subprocess.run([*git, "show", f"{version}:{src}"], check=True, capture_output=True,
                                            text=True).stdout)
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        dst = out / f"ray.io_{plural}.v1.json"
        dst.write_text(json.dumps(copy.deepcopy(v1["schema"]["openAPIV3Schema"]), sort_keys=True,
                                  separators=(",", ":")) + "\n", encoding="utf-8")
        files[dst.name] = src
    (out / "SOURCE.json").write_text(json.dumps({
        "repository": "https://github.com/ray-project/kuberay", "tag": version, "commit": commit,
        "license": "Apache-2.0", "files": files,
        "what": "spec.versions[name=v1].schema.openAPIV3Schema of each CRD, unchanged",
    }, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--vendor"]:
        print(vendor(argv[1], argv[2]))
        return 0
    bad = 0
    for f in argv:
        for doc in documents(f):
            if doc.get("kind") not in KINDS:
                continue
            errs = errors(doc)
            bad += bool(errs)
            print(f"{f}: {doc['kind']} {'ok' if not errs else 'INVALID'}")
            for e in errs:
                print(f"  {e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
