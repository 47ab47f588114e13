"""The chart and the kustomize manifests, checked the way a cluster and a reviewer would.

Each shape (defaults, defaults with the Prometheus operator, every
helm/keel/ci/*-values.yaml) and each overlay goes through kubernetes-validate
(built-in kinds), the upstream CRD schemas in ../shared/crds (Ray and
monitoring kinds), checkov, and our own check of the restricted Pod Security
profile, which checkov cannot see inside RayCluster and RayService pod templates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy import render
from tests.deploy.conftest import CI_VALUES, OVERLAYS, SHAPES

ALL = SHAPES + OVERLAYS
CRDS = Path(os.environ.get("KEEL_CRDS_DIR", render.REPO.parent / "shared" / "crds"))
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


def documents(path: Path) -> list[dict[str, Any]]:
    return render.documents(path.read_text())


def pod_specs(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod a resource creates, Ray pod templates included."""
    kind, spec = document["kind"], document.get("spec", {})
    name = f"{kind}/{document['metadata']['name']}"
    if kind == "Pod":
        yield name, spec
    elif kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield name, spec["template"]["spec"]
    elif kind in ("RayCluster", "RayService"):
        cluster = spec if kind == "RayCluster" else spec["rayClusterConfig"]
        yield f"{name} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name} worker group {group['groupName']}", group["template"]["spec"]


def ray_clusters(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] == "RayCluster":
        return [document["spec"]]
    return [document["spec"]["rayClusterConfig"]] if document["kind"] == "RayService" else []


# -- helm lint and the values schema ------------------------------------------------------------

@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.stem if v else "default")
def test_helm_lint_strict(values: Path | None) -> None:
    command = [render.tool("helm"), "lint", "--strict", str(render.CHART)] + (["--values", str(values)] if values else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("settings, message", [
    (["mlflow.replcas=2"], "additional properties 'replcas' not allowed"),
    (["ray.serving.config.max_batch=4"], "additional properties 'max_batch' not allowed"),
    (["minio.bucket=Bad_Bucket"], "/minio/bucket"),
    (["minio.enabled=false"], "set minio.externalEndpoint"),
    (["mlflow.enabled=false"], "set mlflow.externalUri"),
    (["postgresql.enabled=false"], "set postgresql.external.host"),
    (["ray.training.workerGroups.cpu.minReplicas=5"], "minReplicas (5) is above maxReplicas (4)"),
    (["ray.serving.shadow.modelUri=medical-diagnosis/3"], "/ray/serving/shadow/modelUri"),
    (["ray.serving.shadow.mirror.sample=0"], "/ray/serving/shadow/mirror/sample"),
    (["ray.serving.canary.routing.weight=1"], "/ray/serving/canary/routing/weight"),
])
def test_bad_values_fail_with_a_message_naming_them(settings: list[str], message: str) -> None:
    command = [render.tool("helm"), "template", "keel", str(render.CHART)]
    for setting in settings:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_every_value_is_documented() -> None:
    """helm-docs style: each key carries a `# --` comment, except inside free-form Kubernetes blocks."""
    free_form = {"resources", "requests", "limits", "nodeSelector", "tolerations", "workerGroups", "config",
                 "commonLabels", "selectorLabels"}
    stack: list[tuple[int, str]] = []
    undocumented, previous = [], ""
    for line in (render.CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^(\s*)([A-Za-z_][\w]*):", line)
        if match:
            indent, key = len(match[1]), match[2]
            stack = [(i, k) for i, k in stack if i < indent]
            inside_free_form = any(k in free_form for _, k in stack) and key not in ("config",)
            nested_block = line.rstrip().endswith(":")
            if not inside_free_form and not nested_block and not previous.lstrip().startswith("# --"):
                undocumented.append(".".join([*(k for _, k in stack), key]))
            stack.append((indent, key))
        if line.strip() and not line.lstrip().startswith("#") or line.lstrip().startswith("# --"):
            previous = line
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


# -- every rendered shape -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", ALL)
def test_built_in_kinds_pass_kubernetes_validate(rendered: dict[str, Path], shape: str) -> None:
    result = subprocess.run([render.tool("kubernetes-validate"), "--strict", "-k", "1.33.0", "--no-warn",
                             str(rendered[shape])], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    validated = result.stdout.count(" passed for resource ")
    built_in = [d for d in documents(rendered[shape]) if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert validated == len(built_in), result.stdout


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    if not CRDS.is_dir():
        pytest.fail(f"{CRDS}: the upstream CRDs (shared/crds beside the repository) are missing; "
                    "set KEEL_CRDS_DIR to their folder")
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            api = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def crd_errors(document: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    schema = schemas.get((document["apiVersion"], document["kind"]))
    if schema is None:
        return [f"{document['apiVersion']} {document['kind']}: no upstream CRD knows this kind"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{document['kind']}/{document['metadata']['name']} {'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


@pytest.mark.parametrize("shape", ALL)
def test_custom_resources_match_the_upstream_crds(rendered: dict[str, Path], shape: str,
                                                  crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    custom = [d for d in documents(rendered[shape]) if d["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert {d["kind"] for d in custom} >= {"RayCluster", "RayService"} or shape == "chart-external"
    errors = [error for document in custom for error in crd_errors(document, crd_schemas)]
    assert not errors, errors


def test_the_crd_check_catches_a_wrong_field(rendered: dict[str, Path],
                                             crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    cluster = next(d for d in documents(rendered["default"]) if d["kind"] == "RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    cluster["spec"]["headGroupSpec"]["rayStartParams"] = ["not", "a", "map"]
    assert len(crd_errors(cluster, crd_schemas)) == 2


@pytest.mark.parametrize("shape", ALL)
def test_every_pod_runs_under_the_restricted_profile(rendered: dict[str, Path], shape: str) -> None:
    problems = []
    for document in documents(rendered[shape]):
        for where, pod in pod_specs(document):
            security = pod.get("securityContext", {})
            if not (security.get("runAsNonRoot") and security.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
                problems.append(f"{where}: pod securityContext")
            if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
                problems.append(f"{where}: host namespaces")
            if any("hostPath" in volume for volume in pod.get("volumes", [])):
                problems.append(f"{where}: hostPath volume")
            for container in pod.get("initContainers", []) + pod["containers"]:
                problems += container_problems(f"{where} {container['name']}", container)
        for cluster in ray_clusters(document):
            if cluster.get("enableInTreeAutoscaling"):
                problems += container_problems(f"{document['kind']} autoscaler", cluster["autoscalerOptions"])
    assert not problems, problems


def container_problems(where: str, container: dict[str, Any]) -> list[str]:
    security = container.get("securityContext", {})
    problems = []
    if security.get("allowPrivilegeEscalation") is not False or security.get("privileged"):
        problems.append(f"{where}: privilege escalation allowed")
    if "ALL" not in security.get("capabilities", {}).get("drop", []) or security.get("capabilities", {}).get("add"):
        problems.append(f"{where}: capabilities not dropped")
    if not security.get("readOnlyRootFilesystem") or not security.get("runAsNonRoot"):
        problems.append(f"{where}: writable root filesystem or root user")
    resources = container.get("resources", {})
    if not all(resources.get(kind, {}).get(r) for kind in ("requests", "limits") for r in ("cpu", "memory")):
        problems.append(f"{where}: cpu/memory requests and limits")
    return problems


@pytest.mark.parametrize("shape", ALL)
def test_no_secret_value_is_in_the_manifests(rendered: dict[str, Path], shape: str) -> None:
    """Credentials come only from the existing Secret, by reference or as mounted files."""
    text = rendered[shape].read_text()
    docs = render.documents(text)
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not create Secrets"
    leaks = []
    for document in docs:
        for where, pod in pod_specs(document):
            for container in pod.get("initContainers", []) + pod["containers"]:
                for variable in container.get("env", []):
                    literal = variable.get("value")
                    if SECRET_NAME.search(variable["name"]) and literal is not None and not (
                            variable["name"].endswith(("_FILE", "_PATH")) and literal.startswith("/var/run/secrets/")):
                        leaks.append(f"{where} {container['name']}: {variable['name']} is a literal")
    assert not leaks, leaks
    assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{12,}", text.replace("secretKeyRef", ""))


def test_checkov_finds_nothing_and_every_skip_says_why(rendered: dict[str, Path], tmp_path: Path) -> None:
    for shape in ALL:
        (tmp_path / rendered[shape].name).write_text(rendered[shape].read_text())
    result = subprocess.run([render.tool("checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "secrets",
                             "--quiet", "--skip-download", "--compact", "-o", "json"],
                            capture_output=True, text=True, check=False, timeout=600)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    kubernetes = next(r for r in reports if r.get("check_type") == "kubernetes")
    failed = [f"{c['check_id']} {c['resource']}" for r in reports for c in r["results"].get("failed_checks", [])]
    assert not failed, failed
    assert kubernetes["summary"]["passed"] > 500 and kubernetes["summary"]["parsing_errors"] == 0
    skipped = [c for r in reports for c in r["results"].get("skipped_checks", [])]
    assert all(len(c["check_result"].get("suppress_comment", "")) > 20 for c in skipped), skipped


# -- what the resources say ---------------------------------------------------------------------

def by_kind(path: Path, kind: str) -> list[dict[str, Any]]:
    return [d for d in documents(path) if d["kind"] == kind]


def in_release(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects in the release's own namespace, not their copies where pipeline steps run."""
    return [d for d in objects if d["metadata"].get("namespace") == render.NAMESPACE]


@pytest.mark.parametrize("shape", SHAPES)
def test_rbac_is_least_privilege(rendered: dict[str, Path], shape: str) -> None:
    assert not by_kind(rendered[shape], "ClusterRole") and not by_kind(rendered[shape], "ClusterRoleBinding")
    (role,) = in_release(by_kind(rendered[shape], "Role"))
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        if set(rule["verbs"]) & {"patch", "update", "create", "delete"}:
            assert rule["resources"] == ["rayservices"] and rule["resourceNames"] == ["keel-serve"], rule
    for elsewhere in by_kind(rendered[shape], "Role"):  # where steps run: what KFP and Argo need there, no more
        if elsewhere["metadata"]["namespace"] != render.NAMESPACE:
            assert elsewhere["rules"] == STEP_RULES


# What a KFP v2 step's pod does as its ServiceAccount besides reading Keel's config: KFP's launcher reads its
# ConfigMap and the artifact store's Secret; Argo's executor (3.4+) reports outputs as workflowtaskresults.
STEP_RULES = [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["keel-config", "kfp-launcher"],
               "verbs": ["get"]},
              {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mlpipeline-minio-artifact"],
               "verbs": ["get"]},
              {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_keel_pod_is_behind_a_network_policy(rendered: dict[str, Path], shape: str) -> None:
    policies = by_kind(rendered[shape], "NetworkPolicy")
    deny_all = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/part-of") == "keel"]
    assert deny_all and "ingress" not in deny_all[0]["spec"]
    allowed = {p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in policies}
    for document in documents(rendered[shape]):
        for _, pod in pod_specs(document):
            template = document["spec"].get("template", {})
            component = template.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")
            if document["kind"] in ("Deployment", "StatefulSet"):
                assert component in allowed, f"{document['kind']}/{document['metadata']['name']} has no allow rule"


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "external-values"])
def test_the_served_config_is_the_one_keel_serve_sends(rendered: dict[str, Path], shape: str) -> None:
    """serveConfigV2 validates as keel's ServeConfig and equals the document `keel serve` PUTs to Ray."""
    from keel.serve.control import serve_config_document
    from keel.serve.config import ServeConfig

    (service,) = by_kind(rendered[shape], "RayService")
    document = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = document["applications"][0]["args"]
    config = ServeConfig.model_validate(args["config"])
    assert config.require_token and config.host == "0.0.0.0"
    expected = serve_config_document(args["model_uri"], config)
    expected["applications"][0]["args"]["config"] = args["config"]  # the chart states only what it sets
    assert document == expected


@pytest.mark.parametrize("shape", SHAPES)
def test_the_config_map_speaks_keel_settings(rendered: dict[str, Path], shape: str) -> None:
    from keel.settings import KeelSettings

    (config,) = [c for c in in_release(by_kind(rendered[shape], "ConfigMap")) if c["metadata"]["name"] == "keel-config"]
    keel_keys = {k[len("KEEL_"):].lower() for k in config["data"] if k.startswith("KEEL_")}
    assert keel_keys <= set(KeelSettings.model_fields), keel_keys - set(KeelSettings.model_fields)
    settings = KeelSettings(**{k: config["data"][f"KEEL_{k.upper()}"] for k in keel_keys})
    assert settings.artifact_root.startswith("s3://") and settings.mlflow_tracking_uri.startswith("http")


def credential_keys_read(node: Any, secret: str = "keel-credentials") -> set[str]:
    """Every key of the credentials Secret that ``node`` reads: env secretKeyRefs and secret volumes' items."""
    if isinstance(node, list):
        return set().union(*(credential_keys_read(item, secret) for item in node))
    if not isinstance(node, dict):
        return set()
    keys = set()
    if secret in (node.get("secretName"), node.get("name")) and "items" in node:
        keys |= {item["key"] for item in node["items"]}
    if node.get("secretKeyRef", {}).get("name") == secret:
        keys.add(node["secretKeyRef"]["key"])
    return keys.union(*(credential_keys_read(value, secret) for value in node.values()))


def install_notes(values: Path | None, namespace: str) -> str:
    """What `helm install` prints after installing (no cluster here: the credentials Secret is not found)."""
    command = [render.tool("helm"), "install", "--dry-run=client", render.RELEASE, str(render.CHART), "-n", namespace]
    return render.run(*command, *(["--values", str(values)] if values else [])).split("NOTES:", 1)[1]


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.stem if v else "default")
def test_the_install_notes_create_every_credential_the_release_reads(values: Path | None) -> None:
    """With mlflow.auth on, the notes' `kubectl create secret` left out MLflow's two keys: its pods would wait
    on a key the Secret lacks (CreateContainerConfigError) and the steps get 401s."""
    from keel.cluster import S3_CREDENTIALS

    notes = install_notes(values, "ml")
    created = set(re.findall(r"--from-literal=([\w-]+)=", notes))
    read = credential_keys_read(render.documents(render.helm_template(values))) | set(S3_CREDENTIALS)
    assert "ray-auth-token" in read and read <= created, read - created
    assert "kubectl -n ml create secret generic keel-credentials" in notes
    assert "\n  KEEL_KUBE_NAMESPACE=ml keel status " in notes and "helm test keel -n ml" in notes


def test_monitoring_objects_need_the_operator_and_ship_the_tested_rules(rendered: dict[str, Path]) -> None:
    monitoring_kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not {d["kind"] for d in documents(rendered["default"])} & monitoring_kinds
    cluster = by_kind(rendered["default"], "RayCluster")[0]
    assert cluster["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    with_operator = documents(rendered["default+monitoring"])
    assert {d["kind"] for d in with_operator} >= monitoring_kinds
    (rule,) = [d for d in with_operator if d["kind"] == "PrometheusRule"]
    alerts = yaml.safe_load((render.CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


def ingress_from(policy: dict[str, Any], namespace: str) -> set[int]:
    """The ports a NetworkPolicy lets pods of ``namespace`` (by name) reach."""
    ports: set[int] = set()
    for rule in policy["spec"].get("ingress", []):
        names = {name for source in rule.get("from", [])
                 for expression in source.get("namespaceSelector", {}).get("matchExpressions", [])
                 for name in expression["values"]}
        if namespace in names or "from" not in rule:  # no `from`: every namespace
            ports |= {port["port"] for port in rule["ports"]}
    return ports


@pytest.mark.parametrize("shape", SHAPES)
def test_steps_push_to_the_charts_pushgateway_or_the_one_named(rendered: dict[str, Path], shape: str) -> None:
    (config,) = [c for c in in_release(by_kind(rendered[shape], "ConfigMap")) if c["metadata"]["name"] == "keel-config"]
    services = {s["metadata"]["name"]: s for s in by_kind(rendered[shape], "Service")}
    if shape == "external-values":
        assert config["data"]["KEEL_PUSHGATEWAY_URL"] == "pushgateway.monitoring.svc.cluster.local:9091"
        assert "keel-pushgateway" not in services
        return
    assert config["data"]["KEEL_PUSHGATEWAY_URL"] == f"keel-pushgateway.{render.NAMESPACE}.svc.cluster.local:9091"
    assert [p["port"] for p in services["keel-pushgateway"]["spec"]["ports"]] == [9091]
    (deployment,) = [d for d in by_kind(rendered[shape], "Deployment") if d["metadata"]["name"] == "keel-pushgateway"]
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = pod["containers"][0]["volumeMounts"]
    assert f"--persistence.file={mount['mountPath']}/pushgateway.db" in pod["containers"][0]["args"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "keel-pushgateway"  # outlives the pod
    policies = {p["metadata"]["name"]: p for p in by_kind(rendered[shape], "NetworkPolicy")}
    for namespace in (render.NAMESPACE, "kubeflow"):  # where steps run, and so push from
        assert 9091 in ingress_from(policies["keel-pushgateway"], namespace)


@pytest.mark.parametrize("shape", ["default", "default+monitoring", "prod-values"])
def test_prometheus_reaches_every_metrics_port_past_the_network_policies(rendered: dict[str, Path],
                                                                          shape: str) -> None:
    policies = {p["metadata"]["name"]: p for p in by_kind(rendered[shape], "NetworkPolicy")}
    scraped = {"keel-ray-train": {8080}, "keel-ray-serve": {8080, 8000}, "keel-minio": {9000},
               "keel-pushgateway": {9091}, "keel-mlflow": {9102}}
    for name, ports in scraped.items():
        assert ingress_from(policies[name], "monitoring") >= ports, name
        assert not ingress_from(policies[name], "elsewhere") - {8000}, name  # the serving API is open by default
    assert 9001 not in ingress_from(policies["keel-minio"], "monitoring")  # MinIO's console is not a metric


def test_the_mlflow_servers_metrics_container_serves_what_its_workers_count(rendered: dict[str, Path]) -> None:
    """The server's workers write to a volume the metrics container reads; Prometheus scrapes the container's
    port, by annotation or by the operator's PodMonitor, and never MLflow's API port (behind basic auth)."""
    (deployment,) = [d for d in by_kind(rendered["default"], "Deployment") if d["metadata"]["name"] == "keel-mlflow"]
    pod = deployment["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    (written,) = [a.split("=", 1)[1] for a in containers["mlflow"]["command"] if a.startswith("--expose-prometheus=")]
    mounts = {c: {m["name"]: m for m in containers[c]["volumeMounts"] if m["mountPath"] == written}
              for c in ("mlflow", "metrics")}
    assert mounts["mlflow"].keys() == mounts["metrics"].keys() == {"metrics"}
    assert not mounts["mlflow"]["metrics"].get("readOnly") and mounts["metrics"]["metrics"]["readOnly"]
    assert containers["metrics"]["command"][:4] == ["python", "-m", "keel.monitor.mlflow_metrics", written]
    assert [p["containerPort"] for p in containers["metrics"]["ports"]] == [9102]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9102"  # no operator
    (monitor,) = [d for d in documents(rendered["default+monitoring"])
                  if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "keel-mlflow"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_the_pushgateway_is_scraped_with_the_labels_each_push_carries(rendered: dict[str, Path]) -> None:
    monitors = [d for d in documents(rendered["default+monitoring"]) if d["kind"] == "ServiceMonitor"]
    (gateway,) = [m for m in monitors if m["metadata"]["name"] == "keel-pushgateway"]
    (endpoint,) = gateway["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True and endpoint["port"] == "http"
    (deployment,) = [d for d in by_kind(rendered["default"], "Deployment")
                     if d["metadata"]["name"] == "keel-pushgateway"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"  # no operator


def test_the_prod_shape_trains_on_gpus(rendered: dict[str, Path]) -> None:
    for shape in ("prod-values", "overlays/prod"):
        (cluster,) = by_kind(rendered[shape], "RayCluster")
        groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
        gpu = groups["gpu"]["template"]["spec"]
        assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert gpu["containers"][0]["image"].endswith("-cuda")
        assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu" and groups["gpu"]["maxReplicas"] == 4
        assert cluster["spec"]["enableInTreeAutoscaling"] is True
        (config,) = [c for c in in_release(by_kind(rendered[shape], "ConfigMap"))
                     if c["metadata"]["name"] == "keel-config"]
        # gpus x maxReplicas over the groups: a run asking for more fails at once rather than waiting for nodes
        assert config["data"]["KEEL_RAY_MAX_GPUS"] == "4" and config["data"]["KEEL_RAY_AUTOSCALING"] == "true"


@pytest.mark.parametrize("shape", ["default", "prod-values", "overlays/prod"])
def test_every_namespace_steps_run_in_gets_the_runner_and_the_config(rendered: dict[str, Path], shape: str) -> None:
    """A step's pod reads a ConfigMap and runs as a ServiceAccount of its own namespace: standalone KFP's
    `kubeflow` by default, and a multi-user profile namespace in prod. Each gets both, the config identical to
    the release's; the release's RoleBinding lets each runner reach the RayService; the network lets it in."""
    step_namespaces = {"default": ["kubeflow"]}.get(shape, ["kubeflow", "kubeflow-user-example-com"])
    objects = documents(rendered[shape])
    configs = {c["metadata"]["namespace"]: c["data"] for c in by_kind(rendered[shape], "ConfigMap")
               if c["metadata"]["name"] == "keel-config"}
    assert sorted(configs) == sorted([render.NAMESPACE, *step_namespaces])
    assert all(data == configs[render.NAMESPACE] for data in configs.values())
    assert configs["kubeflow"]["KEEL_KUBE_NAMESPACE"] == render.NAMESPACE  # the deploy step patches it there
    for namespace in step_namespaces:
        assert {(d["kind"], d["metadata"]["name"]) for d in objects if d["metadata"].get("namespace") == namespace} \
            == {("ConfigMap", "keel-config"), ("ServiceAccount", "keel-pipeline-runner"),
                ("Role", "keel-pipeline-runner"), ("RoleBinding", "keel-pipeline-runner")} \
            | ({("Pod", "keel-test-endpoints")} if shape != "overlays/prod" else set())  # `helm test`'s check there
    (binding,) = in_release(by_kind(rendered[shape], "RoleBinding"))
    assert {(s["namespace"], s["name"]) for s in binding["subjects"]} \
        == {(namespace, "keel-pipeline-runner") for namespace in [render.NAMESPACE, *step_namespaces]}
    reachable = {}  # policy -> the namespaces one of its rules lets in
    for policy in by_kind(rendered[shape], "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for source in rule.get("from", []):
                for expression in source.get("namespaceSelector", {}).get("matchExpressions", []):
                    reachable.setdefault(policy["metadata"]["name"], set()).update(expression["values"])
    for name in ("keel-mlflow", "keel-minio", "keel-ray-train"):
        assert reachable[name] >= {render.NAMESPACE, *step_namespaces}, name


def test_steps_pull_the_runtime_image_with_the_charts_pull_secrets() -> None:
    """KFP step pods run as the runner ServiceAccount, so its pull secrets are what lets them pull an image
    from a private registry (`keel submit --image`), in every namespace they run in."""
    text = render.helm_template(None, (), "--set", "imagePullSecrets={regcred}")
    runners = [d for d in render.documents(text) if d["kind"] == "ServiceAccount"
               and d["metadata"]["name"] == "keel-pipeline-runner"]
    assert sorted(r["metadata"]["namespace"] for r in runners) == ["keel", "kubeflow"]
    assert all(r["imagePullSecrets"] == [{"name": "regcred"}] for r in runners)


@pytest.mark.parametrize("settings", [(), ("--set", "pipelineRunner.create=false")], ids=["runner", "no-runner"])
def test_every_pod_can_pull_with_the_charts_pull_secrets(settings: tuple[str, ...]) -> None:
    """Every pod, `helm test`'s included, names the pull secrets itself or runs as a ServiceAccount that does:
    a private registry would otherwise leave it in ImagePullBackOff."""
    docs = render.documents(render.helm_template(None, (), "--set", "imagePullSecrets={regcred}", *settings))
    accounts = {(d["metadata"].get("namespace", render.NAMESPACE), d["metadata"]["name"]): d for d in docs
                if d["kind"] == "ServiceAccount"}
    unable = []
    for document in docs:
        namespace = document["metadata"].get("namespace", render.NAMESPACE)
        for where, spec in pod_specs(document):
            account = accounts.get((namespace, spec.get("serviceAccountName", "default")), {})
            if [{"name": "regcred"}] not in (spec.get("imagePullSecrets"), account.get("imagePullSecrets")):
                unable.append(f"{where} in {namespace}")
    assert not unable


def test_a_release_whose_steps_run_in_its_own_namespace_adds_nothing_elsewhere() -> None:
    """Keel installed into the profile namespace itself (or `namespaces` naming only the release's): no
    copies, one runner, one config; its one Role gives the steps what KFP and Argo need, beside Keel's own."""
    text = render.helm_template(None, (), "--set", f"pipelineRunner.namespaces={{{render.NAMESPACE}}}")
    assert {d["metadata"].get("namespace") for d in render.documents(text)} == {render.NAMESPACE}
    (role,) = [d for d in render.documents(text) if d["kind"] == "Role"]
    assert role["rules"][:3] == STEP_RULES and role["rules"][-2]["resourceNames"] == ["keel-serve"]


def test_another_kfp_release_gets_what_it_asks_for_in_the_step_namespaces(tmp_path: Path) -> None:
    """pipelineRunner.extraRules and artifactSecrets (an artifact store that kfp-launcher names) reach every
    step namespace's Role, and the release's stays as it was."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"pipelineRunner": {
        "artifactSecrets": ["team-s3"], "extraRules": [{"apiGroups": [""], "resources": ["pods"],
                                                         "verbs": ["get", "watch", "patch"]}]}}))
    roles = {d["metadata"]["namespace"]: d["rules"] for d in render.documents(render.helm_template(values))
             if d["kind"] == "Role"}
    assert roles["kubeflow"][1]["resourceNames"] == ["team-s3"] and roles["kubeflow"][-1]["resources"] == ["pods"]
    assert not any("secrets" in r["resources"] or "pods" in r["resources"] for r in roles[render.NAMESPACE])


@pytest.mark.parametrize("autoscaling, max_gpus", [("true", "6"), ("false", "2")])
def test_the_config_map_gives_the_gpus_the_cluster_can_grow_to(autoscaling: str, max_gpus: str) -> None:
    """The prod GPU group at two GPUs per pod, one pod up of at most three (the CPU group has none): six with
    the autoscaler, the two up without it."""
    group = "ray.training.workerGroups.gpu."
    text = render.helm_template(render.CHART / "ci" / "prod-values.yaml", (), "--set",
                                f"ray.training.autoscaling={autoscaling},{group}replicas=1,{group}maxReplicas=3,"
                                f"{group}gpus=2")
    (config,) = [d for d in in_release(render.documents(text)) if d["metadata"]["name"] == "keel-config"]
    assert config["data"]["KEEL_RAY_MAX_GPUS"] == max_gpus and config["data"]["KEEL_RAY_AUTOSCALING"] == autoscaling


# -- manifests: rendered from the chart, applying what helm installs ----------------------------

def test_manifests_are_rendered_from_the_current_chart() -> None:
    stale = []
    if (render.MANIFESTS / "base" / "keel.yaml").read_text() != render.base():
        stale.append("manifests/base/keel.yaml")
    for name in render.OVERLAYS:
        for relative, text in render.overlay(name).items():
            path = render.MANIFESTS / "overlays" / name / relative
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(render.REPO)))
    assert not stale, f"stale: {stale}; run `make manifests`"


@pytest.mark.parametrize("name", render.OVERLAYS)
def test_an_overlay_applies_what_helm_installs_with_its_values(rendered: dict[str, Path], name: str) -> None:
    helm = {render.identity(d): d
            for d in render.documents(render.helm_template(render.CHART / "ci" / f"{name}-values.yaml", (), "--skip-tests"))}
    kustomized = {render.identity(d): d for d in documents(rendered[f"overlays/{name}"])}
    assert kustomized == helm


# -- the image ----------------------------------------------------------------------------------

DOCKERFILE = render.REPO / "platform" / "runtime.Dockerfile"


def test_the_dockerfile_is_clean_under_hadolint() -> None:
    result = subprocess.run([render.tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_non_root_pinned_and_has_a_cuda_variant() -> None:
    text = DOCKERFILE.read_text()
    torch_pin = re.search(r'"(torch==[\d.]+)"', (render.REPO / "pyproject.toml").read_text())
    assert torch_pin and f'"{torch_pin[1]}"' in text
    assert re.search(r"^USER 10001:10001$", text, re.M) and "ARG TORCH_VARIANT=cpu" in text
    assert "-c requirements.lock" in text and ":latest" not in text
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M)


def test_the_image_carries_the_commit_it_is_built_from_into_every_steps_runs() -> None:
    """Steps run in the image, where no repository is: their MLflow runs were tagged commit 'unknown'. The build
    argument `make image` passes becomes KEEL_GIT_COMMIT in the image, which tracking.git_commit reads first."""
    from keel.settings import KeelSettings
    from keel.tracking import git_commit

    build = subprocess.run(["make", "--no-print-directory", "image", "DOCKER=echo"], cwd=render.REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=render.REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert f"--build-arg KEEL_GIT_COMMIT={head} " in build
    final_stage = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    assert "\nARG KEEL_GIT_COMMIT=unknown\n" in final_stage  # an ARG is scoped to the stage that declares it
    assert re.search(r"^\s+KEEL_GIT_COMMIT=\$\{KEEL_GIT_COMMIT\} \\$", final_stage, re.M)
    assert 'org.opencontainers.image.revision="${KEEL_GIT_COMMIT}"' in final_stage
    assert git_commit(KeelSettings(git_commit=head)) == head


def test_the_image_has_the_driver_sqlalchemy_opens_the_charts_backend_store_with() -> None:
    """The chart's MLflow opens postgresql://, for which SQLAlchemy 2.1 imports psycopg 3, not psycopg2: an image
    with only the latter runs a server that crash-loops on its first connection."""
    import tomllib

    from packaging.requirements import Requirement
    from sqlalchemy.engine import make_url

    driver = make_url("postgresql://keel@keel-postgresql/mlflow").get_dialect().driver
    extras = tomllib.loads((render.REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert driver in {Requirement(r).name for r in extras["postgres"]}
    assert re.search(r'-c requirements\.lock "\.\[postgres\]"', DOCKERFILE.read_text())
    assert re.search(rf"^{driver}==", (render.REPO / "requirements.lock").read_text(), re.M)


# -- the code that talks to what the chart installs --------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies the deploy step's patch to a RayService."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def test_the_deploy_steps_patch_yields_a_valid_rayservice(rendered: dict[str, Path],
                                                          crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    from keel.cluster import rayservice_patch

    (service,) = by_kind(rendered["default"], "RayService")
    patched = merge_patch(service, rayservice_patch(service, "models:/medical-diagnosis/7"))
    assert not crd_errors(patched, crd_schemas)
    before, after = (yaml.safe_load(s["spec"]["serveConfigV2"]) for s in (service, patched))
    assert after["applications"][0]["args"]["model_uri"] == "models:/medical-diagnosis/7"
    after["applications"][0]["args"]["model_uri"] = before["applications"][0]["args"]["model_uri"]
    assert after == before and patched["spec"]["rayClusterConfig"] == service["spec"]["rayClusterConfig"]


def same_version(first: str, second: str) -> bool:
    """Registry URIs ending in the same version number (no registry needed)."""
    return first.rsplit("/", 1)[-1] == second.rsplit("/", 1)[-1]


def rayservice_with_challenger(crd_schemas: dict[tuple[str, str], dict[str, Any]], model_uri_setting: str,
                               json_setting: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chart's RayService rendered with a challenger, checked against the CRD, and its Serve config,
    checked against Ray's own schema."""
    from ray.serve.schema import ServeDeploySchema

    (service,) = [d for d in render.documents(render.helm_template(
        None, (), "--set", model_uri_setting, "--set-json", json_setting)) if d["kind"] == "RayService"]
    assert not crd_errors(service, crd_schemas)
    document = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(document)
    return service, document


def test_a_shadow_is_served_as_keel_serve_shadow_deploys_it_and_graduates_on_promotion(
        crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    """ray.serving.shadow.modelUri adds the keel-shadow application `keel serve --shadow` would PUT; the deploy
    step's patch, promoting the shadow's version, removes it and the champion's copying."""
    from keel.cluster import rayservice_patch
    from keel.serve.control import serve_config_document
    from keel.serve.config import ServeConfig

    service, document = rayservice_with_challenger(
        crd_schemas, "ray.serving.shadow.modelUri=models:/medical-diagnosis/3", "ray.serving.shadow.mirror.sample=0.25")
    champion, shadow = (application["args"] for application in document["applications"])
    expected = serve_config_document(champion["model_uri"], ServeConfig.model_validate(champion["config"]),
                                     "models:/medical-diagnosis/3", ServeConfig.model_validate(shadow["config"]))
    expected["applications"][0]["args"]["config"] = champion["config"]  # the chart states only what it sets
    expected["applications"][1]["args"]["config"] = shadow["config"]
    assert document == expected and champion["config"]["shadow"]["sample"] == 0.25

    kept = yaml.safe_load(rayservice_patch(service, "models:/medical-diagnosis/2", same_version)["spec"][
        "serveConfigV2"])
    assert [a["name"] for a in kept["applications"]] == ["keel", "keel-shadow"]
    graduated = yaml.safe_load(rayservice_patch(service, "models:/medical-diagnosis/3", same_version)["spec"][
        "serveConfigV2"])
    assert [a["name"] for a in graduated["applications"]] == ["keel"]
    assert "shadow" not in graduated["applications"][0]["args"]["config"]


def test_a_canary_is_served_as_keel_serve_canary_deploys_it_and_graduates_on_promotion(
        crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    """ray.serving.canary.modelUri adds the keel-canary application `keel serve --canary` would PUT, with
    the champion routing its weight; promoting the canary's version removes both."""
    from keel.cluster import rayservice_patch, summarize, withdrawn_rayservice_patch
    from keel.serve.control import serve_config_document
    from keel.serve.config import ServeConfig

    service, document = rayservice_with_challenger(
        crd_schemas, "ray.serving.canary.modelUri=models:/medical-diagnosis/4", "ray.serving.canary.routing.weight=0.25")
    champion, canary = (application["args"] for application in document["applications"])
    expected = serve_config_document(champion["model_uri"], ServeConfig.model_validate(champion["config"]),
                                     canary_uri="models:/medical-diagnosis/4",
                                     canary_config=ServeConfig.model_validate(canary["config"]))
    expected["applications"][0]["args"]["config"] = champion["config"]  # the chart states only what it sets
    expected["applications"][1]["args"]["config"] = canary["config"]
    assert document == expected and champion["config"]["canary"] == {"weight": 0.25, "timeout_s": 2.0}
    service["metadata"]["name"] = "keel-serve"
    (row,) = summarize([], [service], [])
    assert row["detail"] == ("serving models:/medical-diagnosis@champion, canary models:/medical-diagnosis/4 "
                             "answering 25%")

    graduated = merge_patch(service, rayservice_patch(service, "models:/medical-diagnosis/4", same_version))
    assert not crd_errors(graduated, crd_schemas)
    after = yaml.safe_load(graduated["spec"]["serveConfigV2"])
    assert [a["name"] for a in after["applications"]] == ["keel"]
    assert "canary" not in after["applications"][0]["args"]["config"]
    # `keel models reject` withdraws it instead: the champion stays, without its canary setting
    assert withdrawn_rayservice_patch(service, "models:/medical-diagnosis/5", same_version) == {}
    withdrawn = merge_patch(service, withdrawn_rayservice_patch(service, "models:/medical-diagnosis/4", same_version))
    assert not crd_errors(withdrawn, crd_schemas)
    before = yaml.safe_load(service["spec"]["serveConfigV2"])
    del before["applications"][1], before["applications"][0]["args"]["config"]["canary"]
    assert yaml.safe_load(withdrawn["spec"]["serveConfigV2"]) == before


@pytest.mark.parametrize("preview, app, setting", [
    ("shadow", "keel-shadow", {"sample": 1.0, "max_in_flight": 32, "timeout_s": 2.0}),
    ("canary", "keel-canary", {"weight": 0.2, "timeout_s": 2.0})])
def test_the_deploy_step_adds_a_version_awaiting_approval_beside_the_champion(
        rendered: dict[str, Path], crd_schemas: dict[tuple[str, str], dict[str, Any]], preview: str, app: str,
        setting: dict[str, Any]) -> None:
    """registry.preview: what the deploy step patches into the RayService for a version awaiting approval."""
    from ray.serve.schema import ServeDeploySchema

    from keel.cluster import applications_patch
    from keel.serve.config import CanaryConfig, with_canary, with_shadow

    uri = "models:/medical-diagnosis/8"
    beside = {"shadow": lambda apps: with_shadow(apps, "keel", uri),
              "canary": lambda apps: with_canary(apps, "keel", uri, CanaryConfig(weight=0.2))}[preview]
    (service,) = by_kind(rendered["default"], "RayService")
    patched = merge_patch(service, applications_patch(service, beside))
    assert not crd_errors(patched, crd_schemas)
    before, after = (yaml.safe_load(s["spec"]["serveConfigV2"]) for s in (service, patched))
    ServeDeploySchema.model_validate(after)
    assert [a["name"] for a in after["applications"]] == ["keel", app]
    assert after["applications"][1]["args"]["model_uri"] == uri
    assert after["applications"][0]["args"]["config"].pop(preview) == setting
    assert after["applications"][0] == before["applications"][0]  # the champion is otherwise untouched


def test_pipeline_steps_read_exactly_what_the_chart_provides(rendered: dict[str, Path]) -> None:
    from keel import cluster

    chart_keys = set()
    for shape in SHAPES:  # prod turns MLflow auth on, which adds the user name
        (config,) = [c for c in in_release(by_kind(rendered[shape], "ConfigMap"))
                     if c["metadata"]["name"] == cluster.CONFIG_MAP]
        chart_keys |= set(config["data"])
    assert chart_keys == set(cluster.CONFIG_MAP_KEYS)
    values = yaml.safe_load((render.CHART / "values.yaml").read_text())["credentials"]
    assert values["existingSecret"] == cluster.CREDENTIALS_SECRET
    assert set(cluster.S3_CREDENTIALS) == {values["s3AccessKeyKey"], values["s3SecretKeyKey"]}
    assert set(cluster.RAY_TOKEN) == {values["rayAuthTokenKey"]}
    assert set(cluster.MLFLOW_PASSWORD) == {values["mlflowAdminPasswordKey"]}
    (role,) = in_release(by_kind(rendered["default"], "Role"))
    (account,) = [a for a in in_release(by_kind(rendered["default"], "ServiceAccount"))
                  if "pipeline-runner" in a["metadata"]["name"]]
    from keel.submit import DEFAULT_SERVICE_ACCOUNT

    assert account["metadata"]["name"] == DEFAULT_SERVICE_ACCOUNT and role["metadata"]["name"] == DEFAULT_SERVICE_ACCOUNT
    compiled = list(yaml.safe_load_all((render.REPO / "pipelines" / "compiled" / "medical_diagnosis.yaml").read_text()))
    inputs = compiled[0]["root"]["inputDefinitions"]["parameters"]
    assert inputs["config_map"]["defaultValue"] == cluster.CONFIG_MAP
    assert inputs["credentials_secret"]["defaultValue"] == cluster.CREDENTIALS_SECRET
    assert inputs["gpus"]["defaultValue"] == 0


@pytest.mark.parametrize("shape", ALL)
def test_mlflow_migrates_its_store_before_the_server_starts(rendered: dict[str, Path], shape: str,
                                                           tmp_path: Path) -> None:
    """`helm upgrade` to a release with a newer MLflow: the init container migrates the very store the server
    opens, with the server's credentials, and is a no-op on a current one (run here against SQLite)."""
    deployments = [d for d in by_kind(rendered[shape], "Deployment") if d["metadata"]["name"].endswith("-mlflow")]
    if not deployments:  # an external MLflow: its owner migrates it
        assert shape == "external-values"
        return
    pod = deployments[0]["spec"]["template"]["spec"]
    upgrade, server = pod["initContainers"][0], pod["containers"][0]
    (backend,) = [arg.split("=", 1)[1] for arg in server["command"] if arg.startswith("--backend-store-uri=")]
    auth = ["--auth"] if "--app-name=basic-auth" in server["command"] else []
    assert upgrade["name"] == "upgrade-database"
    assert upgrade["command"] == ["python", "-m", "keel.tracking_store", backend, *auth]
    password = {e["name"]: e for e in server["env"]}["PGPASSWORD"]
    assert {e["name"]: e for e in upgrade["env"]}["PGPASSWORD"] == password and upgrade["image"] == server["image"]
    if shape != "default":
        return
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):  # creates the tables on an empty store, then finds nothing to do
        result = subprocess.run([sys.executable, *upgrade["command"][1:3], store], capture_output=True, text=True,
                                timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version, create_sqlalchemy_engine

    assert _get_schema_version(create_sqlalchemy_engine(store)) == _get_latest_schema_revision()
