"""cluster/: every config loads and validates with the tool that will read it, and a two-node Ray cluster on this
machine runs `trtseg predict` with actors on both nodes and the masks of a one-process run."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import run_ray_cli, write_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
KUBERNETES_VERSION = "1.33.0"


def _load(rel: str) -> list[dict]:
    with open(os.path.join(CLUSTER, rel)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# -- the Ray cluster launcher ---------------------------------------------------------------------------------

def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = _load("launcher/aws-gpu.yaml")[0]
    filled = prepare_config(copy.deepcopy(cfg))  # what `ray up` does: Ray's defaults merged in, then validated
    validate_config(filled)
    assert filled["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert {t: v.get("max_workers") for t, v in filled["available_node_types"].items() if t != "head"} == \
        {"gpu_a10g": 16, "gpu_h100x8": 2}
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_a10g"]["min_workers"] = "none"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_runtime_env_parses_with_ray():
    from ray.runtime_env import RuntimeEnv
    env = yaml.safe_load(open(os.path.join(CLUSTER, "runtime_env.yaml")))
    parsed = RuntimeEnv(**env)
    assert parsed["working_dir"] == "." and ".venv/" in parsed["excludes"]
    assert all(isinstance(v, str) for v in parsed["env_vars"].values())


# -- KubeRay and Kubernetes -----------------------------------------------------------------------------------

CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}


def _strict(schema):
    """An OpenAPI v3 structural schema as JSON Schema with unknown fields refused: every object that lists its
    properties is closed, unless the schema keeps unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def kuberay_validator():
    """Validates a ray.io/v1 object against the openAPIV3Schema of KubeRay's complete CRD (tests/data/kuberay/),
    strictly."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    validators = {}
    for kind, name in CRDS.items():
        with open(os.path.join(ROOT, "tests", "data", "kuberay", name)) as f:
            crd = yaml.load(f, Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))

    def validate(obj: dict) -> None:
        assert obj["apiVersion"] == "ray.io/v1", obj["apiVersion"]
        validators[obj["kind"]].validate(obj)
    return validate


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_kuberay_manifests_validate_and_run_a_real_trtseg_command(name, kuberay_validator):
    from ray.runtime_env import RuntimeEnv

    from trtseg.cli import _predict_parser
    (obj,) = _load(f"kuberay/{name}")
    kuberay_validator(obj)
    job = obj["spec"].get("jobTemplate", obj["spec"])
    cluster = job.get("rayClusterSpec", obj["spec"])
    gpu_group = cluster["workerGroupSpecs"][0]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and cluster["enableInTreeAutoscaling"] is True
    if "entrypoint" in job:  # the entrypoint is a valid trtseg predict command line
        argv = shlex.split(job["entrypoint"])
        assert argv[:2] == ["trtseg", "predict"]
        args = _predict_parser().parse_args(argv[2:])
        assert args.input.startswith("s3://") and args.cache.startswith("s3://")  # --engine-cache (EngineSpec.cache)
        RuntimeEnv(**yaml.safe_load(job["runtimeEnvYAML"]))
        assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1
        assert job["activeDeadlineSeconds"] > 0
    # a misspelt field, a misplaced one and a wrong type are each refused
    for mutate in (lambda o: o["spec"].__setitem__("shutdownAfterJobFinish", True),
                   lambda o: gpu(o).__setitem__("maxReplica", 3),
                   lambda o: gpu(o).__setitem__("minReplicas", "zero")):
        bad = copy.deepcopy(obj)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            kuberay_validator(bad)


def gpu(obj: dict) -> dict:
    spec = obj["spec"].get("jobTemplate", obj["spec"])
    return spec.get("rayClusterSpec", spec)["workerGroupSpecs"][0]


def test_cronjob_fallback_validates_against_kubernetes_schemas():
    import kubernetes_validate
    docs = _load("kuberay/cronjob-submit-rayjob.yaml")
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "CronJob"]
    for d in docs:
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
    cron = docs[-1]
    # the RayJob it submits is rayjob.yaml itself (validated against KubeRay's CRD above), mounted from a ConfigMap
    text = open(os.path.join(CLUSTER, "kuberay", "cronjob-submit-rayjob.yaml")).read()
    assert "--from-file=rayjob.yaml=cluster/kuberay/rayjob.yaml" in text
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "trtseg-rayjob"
    assert cron["spec"]["schedule"] == _load("kuberay/raycronjob.yaml")[0]["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


# -- the images -----------------------------------------------------------------------------------------------

def _readme_image_install() -> str:
    text = open(os.path.join(ROOT, "docs", "install.md")).read()
    m = re.search(r"```bash\n *# container images\n *(.+?)\n *```", text, re.S)
    assert m, "docs/install.md: the container-image install block is missing"
    return m.group(1).strip()


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_image_installs_with_the_readmes_install_step(name):
    text = open(os.path.join(CLUSTER, "image", name)).read()
    runs = [line[len("RUN "):].strip() for line in text.splitlines() if line.startswith("RUN ")]
    install = _readme_image_install()
    assert install in runs, f"{name}: no RUN line is docs/install.md's install step {install!r}"
    assert "make install" in install
    copied = {src.rstrip("/") for line in text.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]}
    assert {"pyproject.toml", "Makefile", "scripts", "trtseg"} <= copied  # trtseg/ holds accel/ and jobs/


# -- a two-node Ray cluster on one host -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _guide_block() -> list[str]:
    text = open(os.path.join(CLUSTER, "README.md")).read()
    m = re.search(r"```bash\n# two-node example\n(.+?)\n```", text, re.S)
    assert m, "cluster/README.md: the two-node example block is missing"
    return m.group(1).strip().splitlines()


@pytest.mark.slow
def test_two_node_cluster_places_actors_on_both_nodes_and_gives_one_process_masks(small_model, tmp_path):
    import ray
    if ray.is_initialized():
        ray.shutdown()
    inp = tmp_path / "in"
    write_case(str(inp), "a", (70, 61, 23), (0.8, 0.8, 3.1), oblique_deg=20, zero_border=3)
    write_case(str(inp), "b", (52, 66, 30), (0.9, 0.9, 2.0), seed=5)
    from trtseg.cli import main
    assert main(["predict", "-i", str(inp), "-o", str(tmp_path / "one"), "-m", small_model, "--single-process"]) == 0

    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "HEAD_PORT": str(_free_port()), "DASHBOARD_PORT": str(_free_port()),
           "INPUT": str(inp), "OUTPUT": str(tmp_path / "two"), "MODEL": small_model}
    *run, stop = _guide_block()
    try:
        for line in run:
            r = run_ray_cli(["bash", "-c", line], cwd=ROOT, env=env, timeout=600)
            assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    finally:
        subprocess.run(["bash", "-c", stop], env=env, capture_output=True)
    report = json.load(open(tmp_path / "two" / "run_report.json"))
    assert report["summary"]["ok"] == 2 and report["job"]["ray_address"] != "local"
    nodes = {a["node_id"] for a in report["actors"]}
    assert len(report["actors"]) == 2 and len(nodes) == 2 and None not in nodes
    assert all(a["tiles"] > 0 for a in report["actors"])
    for case in ("a", "b"):
        one = nib.load(str(tmp_path / "one" / f"{case}.nii.gz"))
        two = nib.load(str(tmp_path / "two" / f"{case}.nii.gz"))
        assert np.array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj))
        assert np.array_equal(one.affine, two.affine)
