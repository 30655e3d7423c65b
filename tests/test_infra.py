"""cluster.yaml, the on-prem launcher config and the KubeRay manifests: parse, validate, stay consistent."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from definemed.ops.manifests import validate_file

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
LAUNCHER_FILES = [REPO / "cluster.yaml", REPO / "infra" / "cluster-onprem.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_configs_pass_rays_own_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)  # Ray's ray-schema.json + its cross-field rules
    assert validate_file(path) == ["cluster-launcher"]


def test_cloud_cluster_has_the_node_types_the_stages_need():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert types["a100_40gb"]["resources"]["GPU"] == 8 and types["a100_80gb"]["resources"]["GPU"] == 8
    assert types["cpu_labelling"]["resources"].get("GPU", 0) == 0
    for name in ("a100_40gb", "a100_80gb", "cpu_labelling"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]  # autoscaled from zero
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0


def test_launcher_schema_rejects_a_broken_edit(tmp_path):
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg["available_node_types"]["a100_40gb"]["min_workers"] = 9  # above its max_workers
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="min_workers"):
        validate_file(p)
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg["head_start_ray_commands"][-1] = cfg["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="127.0.0.1"):
        validate_file(p)


def test_raycluster_manifest():
    assert validate_file(K8S / "raycluster.yaml") == ["RayCluster"]
    rc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    import ray

    assert rc["spec"]["rayVersion"] == ray.__version__  # image and pinned Ray must match
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert {"cpu-labelling", "a100-40gb", "a100-80gb"} <= set(groups)
    for name in ("a100-40gb", "a100-80gb"):
        res = groups[name]["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"


def test_raycluster_schema_rejects_gpu_group_without_gpu(tmp_path):
    rc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    for g in rc["spec"]["workerGroupSpecs"]:
        if g["groupName"] == "a100-80gb":
            del g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    p = tmp_path / "rc.yaml"
    p.write_text(yaml.safe_dump(rc))
    with pytest.raises(ValueError, match="nvidia.com/gpu"):
        validate_file(p)


def test_rayjobs_are_generated_and_point_at_real_entrypoints():
    import importlib.util

    spec = importlib.util.spec_from_file_location("k8s_stages", K8S / "stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rendered = mod.render()
    on_disk = {p.name: p.read_text() for p in K8S.glob("rayjob-*.yaml")}
    assert on_disk == rendered, "run `python infra/k8s/stages.py` after editing its table"
    from definemed.stages import STAGES

    stage_names = set(mod.STAGES) - {"pipeline"}
    assert stage_names <= set(STAGES), "every RayJob stage must be a registered definemed stage"
    for name in sorted(on_disk):
        assert validate_file(K8S / name) == ["RayJob"]  # module and cluster config exist


def test_readme_docs_and_airgap_guide_reference_real_files():
    docs = [REPO / "README.md", REPO / "infra" / "AIRGAP.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "".join(p.read_text() for p in docs)
    paths = set(re.findall(r"(?<![\w/.-])((?:infra|configs|benchmarks|serve|jobs|scripts)/[\w./-]+\.(?:ya?ml|py|md|sh))", text))
    paths |= {p for p in re.findall(r"(?<![\w/.-])(cluster\.yaml)", text)}
    missing = sorted(p for p in paths if "*" not in p and not (REPO / p).exists())
    assert not missing, f"README/docs/AIRGAP mention files that do not exist: {missing}"
    for mod in set(re.findall(r"python -m (jobs\.[a-z_]+)", text)):
        assert (REPO / (mod.replace(".", "/") + ".py")).exists(), mod


def test_rayservice_manifest_serves_our_app_with_secret_keys_and_probes():
    assert validate_file(K8S / "rayservice.yaml") == ["RayService"]
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert [a["import_path"] for a in serve_cfg["applications"]] == [a["import_path"] for a in local["applications"]]
    app_cfg = serve_cfg["applications"][0]["args"]["config"]
    assert (REPO / app_cfg).exists()
    key_file = yaml.safe_load((REPO / app_cfg).read_text())["api_key_file"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert str(Path(key_file).parent) in mounts  # the app's key file comes from the Secret volume
    secret = yaml.safe_load((K8S / "secret-example.yaml").read_text())
    assert Path(key_file).name in secret["stringData"]


def test_rayservice_schema_rejects_missing_probe(tmp_path):
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    del rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    p = tmp_path / "rs.yaml"
    p.write_text(yaml.safe_dump(rs))
    with pytest.raises(ValueError, match="readinessProbe"):
        validate_file(p)


def test_readme_is_a_short_map_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme) <= 12_000, "README.md is a map; move detail into docs/"
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


# ---- real JSON-schema validation: KubeRay's own CRD schemas, Kubernetes' own schemas for core kinds --------------
K8S_VERSION = "1.33.0"  # the Kubernetes schemas of kubernetes-validate used for Secret / NetworkPolicy


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_k8s_manifest_passes_its_json_schema(path):
    """KubeRay kinds against the openAPIV3Schema of KubeRay's CRDs (vendored in infra/kuberay-crds/), the others
    against Kubernetes' schemas; both reject fields the schema does not declare, as `kubectl apply` does."""
    import kubernetes_validate

    from definemed.ops import kuberay_schema as kr

    docs = list(kr.documents(path))
    assert docs
    for doc in docs:
        if doc["kind"] in kr.KINDS:
            assert kr.errors(doc) == [], path.name
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kuberay_schema_catches_what_the_api_server_would_reject():
    from definemed.ops import kuberay_schema as kr

    rc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    bad = copy.deepcopy(rc)
    bad["spec"]["headGroupSpec"]["rayStartParam"] = bad["spec"]["headGroupSpec"].pop("rayStartParams")  # typo
    assert any("rayStartParam" in e for e in kr.errors(bad))
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "sixteen"
    assert any("workerGroupSpecs.0.maxReplicas" in e for e in kr.errors(bad))
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [1]
    assert kr.errors(bad)
    job = yaml.safe_load((K8S / "rayjob-cpt.yaml").read_text())
    job["spec"]["backoffLimit"] = "2"  # an integer in the CRD
    assert any("backoffLimit" in e for e in kr.errors(job))
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    rs["apiVersion"] = "ray.io/v1alpha1"
    assert any("apiVersion" in e for e in kr.errors(rs))


def test_vendored_crd_schemas_record_their_kuberay_release():
    import json

    from definemed.ops import kuberay_schema as kr

    src = json.loads((REPO / "infra" / "kuberay-crds" / kr.VERSION / "SOURCE.json").read_text())
    assert src["tag"] == kr.VERSION and re.fullmatch(r"[0-9a-f]{40}", src["commit"])
    for name in src["files"]:
        s = json.loads((REPO / "infra" / "kuberay-crds" / kr.VERSION / name).read_text())
        assert s["type"] == "object" and "spec" in s["properties"]


def test_gpu_check_script_writes_valid_configs(tmp_path):
    """scripts/gpu_check.sh has not run on a GPU yet (none lent); its configs are checked here so it is ready."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path)}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--validate-only"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [ln.split()[:2] for ln in r.stdout.splitlines()] == [
        ["tiny-models", "ok"], ["annotate", "ok"], ["pack", "ok"], ["serve-demo", "ok"], ["cpt", "ok"]]
    cpt = yaml.safe_load((tmp_path / "cpt.yaml").read_text())
    assert cpt["parallel"]["use_gpu"] is True and cpt["train"]["max_steps"] == 20
    assert yaml.safe_load((tmp_path / "annotate.yaml").read_text())["engine"]["accelerator"] == "gpu"


def test_torch_only_gpu_check_runs_its_torchrun_path_on_two_gloo_processes(tmp_path):
    """What `scripts/gpu_check.sh --torch-only` runs on a torch-only GPU machine, run here as CI can: the same
    torchrun launch of definemed.train.torchrun (2 processes, gloo, tiny shape, FSDP2 with the bf16 policy) and
    the MFU benchmark's dry run, with Ray, vLLM, mergekit, pydantic, accelerate and pyarrow unimportable."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path)}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--torch-only", "--validate-only"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr + (tmp_path / "cpt.log").read_text()
    assert [ln.split()[:2] for ln in r.stdout.splitlines()[:3]] == [["imports", "ok"], ["cpt", "PASS"],
                                                                    ["mfu", "ok"]]
    s = json.loads((tmp_path / "cpt_torchrun.json").read_text())
    assert s["world_size"] == 2 and s["backend"] == "gloo" and s["compute_dtypes"] == ["torch.bfloat16"]
    assert s["final_loss"] < s["first_loss"]  # the step trains: both ranks memorise their rows
