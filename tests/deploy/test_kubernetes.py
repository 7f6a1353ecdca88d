"""deploy/kubernetes: validated offline against the Kubernetes API schemas, and checked against the node's
own contract (service name, port, health endpoint, data directory, user)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "talentnest.yaml"
# The oldest Kubernetes minor still in wide use whose schemas the validator ships, and its newest.
VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFESTS.read_text()) if doc]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _documents() if doc["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_resource_is_valid(version: str) -> None:
    documents = _documents()
    assert {doc["kind"] for doc in documents} >= {"Service", "StatefulSet", "PodDisruptionBudget"}
    for doc in documents:
        # strict: unknown fields (typos) are errors too. Raises ValidationError with the path of the problem.
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_mistakes() -> None:
    statefulset = copy.deepcopy(_by_kind("StatefulSet")[0])
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, VERSIONS[-1], strict=True)
    statefulset = copy.deepcopy(_by_kind("StatefulSet")[0])
    statefulset["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, VERSIONS[-1], strict=True)


def test_manifests_match_the_node() -> None:
    (statefulset,) = _by_kind("StatefulSet")
    (pdb,) = _by_kind("PodDisruptionBudget")
    services = {doc["metadata"]["name"]: doc for doc in _by_kind("Service")}
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    # Peers must resolve each other before they are ready: readiness comes after the first election.
    assert headless["spec"]["publishNotReadyAddresses"] is True

    pod = statefulset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert headless["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]

    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["SERVICE_NAME"]["value"] == headless["metadata"]["name"]
    assert "secretKeyRef" in env["JWT_SECRET"]["valueFrom"]  # never a literal secret in the manifest
    port = int(env["PORT"]["value"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    # Liveness must not depend on the database (its integrity check at start may take minutes on a large
    # file); readiness must (a node whose database is being checked, corrupt or on a full disk takes no
    # client traffic).
    assert container["livenessProbe"]["httpGet"]["path"] == "/cluster/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in claims and env["DATA_DIR"]["value"] == "/data"
    # The image's user; fsGroup makes the claimed volume writable for it.
    security = pod["spec"]["securityContext"]
    assert security["runAsUser"] == 10001 and security["fsGroup"] == 10001 and security["runAsNonRoot"]
    # SIGTERM -> goodbye -> exit within 2 s: the grace period leaves room.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 2
