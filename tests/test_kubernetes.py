"""Kubernetes: the Volcano Job that `torchx run -s kubernetes --dryrun` makes for each component.

No API server here (none can be installed from a registry): each pod template is validated as a v1
PodTemplate with `kubernetes-validate --strict` (the official OpenAPI schemas; unknown fields rejected),
the Job itself against deploy/kubernetes/volcano-job.schema.json (the Volcano Job CRD's fields and limits), and
the image, resources, replicas, env, mounts and rendezvous wiring are asserted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from torchx.runner import get_runner

from tests.launch_support import REPO, VENV_BIN, run

SCHEMA = json.loads((REPO / "deploy/kubernetes/volcano-job.schema.json").read_text())
IMAGE = "registry.example.com/ml/kdq:0.1.0"
COMMON = ["--image", IMAGE, "--env", "OMP_NUM_THREADS=1,KDQ_DATA_DIR=/data", "--max_retries", "2"]
COMMON += ["--mounts", "type=volume,src=kdq-runs,dst=/runs,type=volume,src=kdq-data,dst=/data,readonly"]
TRAIN = ["--run_dir", "/runs/demo", "--epochs", "1"]
CASES = {
    "teacher": ["-j", "2x1", "--cpu", "4", "--memMB", "8000", *COMMON, *TRAIN],
    "distill": ["-j", "2x2", "--cpu", "4", "--gpu", "2", "--memMB", "16000", *COMMON, *TRAIN],
    "export": ["--checkpoint", "/runs/demo/student_qat/checkpoint.pt", "--cpu", "2", "--memMB", "4000", *COMMON],
    "pipeline": ["-j", "2x1", "--cpu", "4", "--memMB", "8000", *COMMON, "--run_dir", "/runs/demo"],
}


def volcano_job(component: str, args: list[str]) -> dict:
    """The scheduler request exactly as `torchx run --dryrun` prints it, as data."""
    info = get_runner().dryrun_component(
        f"{REPO}/components.py:{component}", args, scheduler="kubernetes",
        cfg={"queue": "kdq", "namespace": "ml"}, workspace=None,
    )  # fmt: skip
    return yaml.safe_load(str(info.request))


def validate_pod_templates(job: dict, tmp_path: Path) -> None:
    files = []
    for task in job["spec"]["tasks"]:
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": task["name"], "namespace": "ml"},
            "template": task["template"],
        }
        path = tmp_path / f"{task['name']}.yaml"
        path.write_text(yaml.safe_dump(template))
        files.append(path)
    out = run([VENV_BIN / "kubernetes-validate", "--strict", *files], timeout=120).stdout
    assert out.count(" passed for resource podtemplate/") == len(files), out


@pytest.mark.parametrize("component", list(CASES))
def test_volcano_job_is_valid_and_wired(component, tmp_path):
    args = CASES[component]
    job = volcano_job(component, args)
    jsonschema.validate(job, SCHEMA)
    validate_pod_templates(job, tmp_path)

    spec = job["spec"]
    assert spec["queue"] == "kdq" and spec["schedulerName"] == "volcano"
    assert spec["maxRetry"] == 2
    # svc: a headless service so replica 0's name (VC_<ROLE>_0_HOSTS) resolves; env: the VC_* variables.
    assert "svc" in spec["plugins"] and "env" in spec["plugins"]
    nnodes = int(args[args.index("-j") + 1].split("x")[0]) if "-j" in args else 1
    assert [t["name"] for t in spec["tasks"]] == [f"{component}-{i}" for i in range(nnodes)]
    for index, task in enumerate(spec["tasks"]):
        assert task["replicas"] == 1
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        assert pod["restartPolicy"] == "Never"

        cpu, mem = args[args.index("--cpu") + 1], args[args.index("--memMB") + 1]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["cpu"] == f"{int(cpu) * 1000}m" and limits["memory"] == f"{mem}M"
        assert requests["cpu"] and requests["memory"]  # TorchX reserves a little for the node's daemons
        if "--gpu" in args:
            assert str(limits["nvidia.com/gpu"]) == args[args.index("--gpu") + 1]

        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["OMP_NUM_THREADS"] == "1" and env["KDQ_DATA_DIR"] == "/data"

        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes[mounts["/runs"]["name"]]["persistentVolumeClaim"]["claimName"] == "kdq-runs"
        assert mounts["/data"]["readOnly"] is True

        command = " ".join(container["command"])
        if nnodes > 1:
            nproc = args[args.index("-j") + 1].split("x")[1]
            role = component.upper()
            # torchrun on every task, all meeting at task 0's c10d store: ${VC_<ROLE>_0_HOSTS}:29500 (Volcano's
            # env/svc plugins), task 0 itself at localhost.
            host = "TORCHX_RANK0_HOST" if index == 0 else f"VC_{role}_0_HOSTS"
            assert f"--rdzv_endpoint ${{{host}:=localhost}}:29500" in command, command
            if index == 0:
                assert env["TORCHX_RANK0_HOST"] == "localhost"
            assert f"--nnodes {nnodes} --nproc_per_node {nproc}" in command and "--rdzv_backend c10d" in command
            assert {"containerPort": 29500, "name": "c10d"} in container["ports"]
        else:
            assert container["command"][0] == "kdq" and "torchrun" not in command
        if component == "pipeline":  # `kdq pipeline` itself on every task: rank 0 alone exports (kdq/pipeline.py)
            assert command.endswith("-m kdq.cli pipeline --preset demo --run-dir /runs/demo --resume"), command

    if component == "export":
        assert container["command"] == ["kdq", "export", "/runs/demo/student_qat/checkpoint.pt", "--target", "x86"]


def test_job_schema_follows_the_volcano_crd():
    """Fields the CRD allows beyond what TorchX emits validate; its enums and name patterns are enforced."""
    job = volcano_job("distill", CASES["distill"])
    richer = copy.deepcopy(job)
    richer["spec"]["networkTopology"] = {"mode": "soft", "highestTierAllowed": 2}
    richer["spec"]["policies"] = [{"event": "PodEvicted", "action": "RestartJob"}]
    richer["spec"]["tasks"][0]["partitionPolicy"] = {"partitionSize": 1, "totalPartitions": 2}
    richer["spec"]["volumes"] = [{"mountPath": "/scratch", "volumeClaimName": "scratch"}]
    jsonschema.validate(richer, SCHEMA)
    broken = [
        ("queue", "ML_Queue"),  # not a DNS subdomain
        ("policies", [{"event": "PodExploded", "action": "RestartJob"}]),  # no such event
        ("networkTopology", {"mode": "strict"}),
        ("volumes", [{"mountPath": "/a:b"}]),
    ]
    for field, value in broken:
        bad = copy.deepcopy(job)
        bad["spec"][field] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMA)


def test_validators_reject_broken_jobs(tmp_path):
    """The checks have teeth: a bad replica count, an unknown field, a bad quantity are all caught."""
    job = volcano_job("distill", CASES["distill"])
    bad = json.loads(json.dumps(job))
    bad["spec"]["tasks"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    bad = json.loads(json.dumps(job))
    bad["spec"]["taskz"] = bad["spec"].pop("tasks")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)

    pod = job["spec"]["tasks"][0]["template"]
    pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "lots"
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": pod})
    )
    out = run([VENV_BIN / "kubernetes-validate", "--strict", path], timeout=120, check=False)
    assert out.returncode != 0 and "imagePullPolicyy" in out.stdout, out.stdout


def test_cli_dryrun_from_the_repo_root():
    """What a user types: the repo's .torchxconfig supplies the Volcano queue and namespace."""
    out = run(
        [VENV_BIN / "torchx", "run", "-s", "kubernetes", "--dryrun", "--workspace", "",
         "components.py:distill", "--image", IMAGE, "-j", "2x1"],
        cwd=REPO, timeout=120,
    ).stdout  # fmt: skip
    request = yaml.safe_load(out.split("=== SCHEDULER REQUEST ===", 1)[1])
    jsonschema.validate(request, SCHEMA)
    assert request["spec"]["queue"] == "default" and len(request["spec"]["tasks"]) == 2
