#!/usr/bin/env python3
"""Helm post-renderer for a TEST run of deploy/helm/tensafe under `podman kube play` (podman 4.3): reads the
rendered manifests on stdin, writes them to stdout with exactly these changes, each because podman 4.3 cannot
do what a Kubernetes cluster does (a real cluster installs the chart unmodified):

1. ``env[].valueFrom.secretKeyRef`` -> a literal ``value``: podman 4.3.1 fails every secretKeyRef lookup
   ("secret ... is not valid JSON"), whether the Secret came from a kube YAML or `podman secret create`.
2. ``volumes[].secret`` -> ``hostPath`` (a read-only directory holding the Secret's keys as files): the same
   podman secret store is behind secret volumes (podman#16636).
3. every container port gets ``hostIP: 127.0.0.1`` and its own ``hostPort``: podman has no Services, and
   podman 4.3 publishes a container port without a hostPort on 0.0.0.0 at the same number (six pods would all
   take 0.0.0.0:50051 and 0.0.0.0:9090). The test reaches each pod on its own loopback ports.
4. each ``emptyDir`` volume is renamed ``<deployment>-<volume>``: podman 4.3 makes an emptyDir a named volume
   called by the pod's volume name, so every pod's ``tmp`` (and ``data``) would be one shared volume.
5. the ML services' ``models`` volume (an emptyDir by default) -> a read-only ``hostPath`` of base models, when
   TENSAFE_KP_MODELS names one (a cluster uses ``models.existingClaim``).
6. the objects podman does not play are dropped (Service, PodDisruptionBudget, ServiceAccount,
   HorizontalPodAutoscaler, ServiceMonitor, NetworkPolicy): podman 4.3 has no such controllers.

Everything else (images, commands, security contexts, resources, the PVC, the peer endpoints) is the chart's.
podman 4.3 ignores the gRPC probes (the test polls health itself). Render with ``--set peerHostSuffix=-pod-0``
(podman names a Deployment's pod ``<name>-pod-0`` and its DNS resolves that name on a podman network) and
``--set networkPolicy.enabled=false``.

Configuration (environment):
  TENSAFE_KP_SECRETS  a directory with one subdirectory per Secret name, one file per key (required)
  TENSAFE_KP_PORTS    JSON {"vault": {"grpc": 40123, "metrics": 40124}, ...}: each service's ports on 127.0.0.1
                      (required: every container port needs one)
  TENSAFE_KP_MODELS   a host directory of base models for the models volume (optional)

  helm template ts deploy/helm/tensafe --set peerHostSuffix=-pod-0 --set networkPolicy.enabled=false \
      --post-renderer tests/deploy/kube_play_post_render.py > kube.yaml
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

PLAYED = {"Deployment", "PersistentVolumeClaim"}
DROPPED = {"Service", "PodDisruptionBudget", "ServiceAccount", "HorizontalPodAutoscaler", "ServiceMonitor",
           "NetworkPolicy"}


def _secret_value(secrets: Path, name: str, key: str) -> str:
    path = secrets / name / key
    if not path.is_file():
        raise SystemExit(f"kube_play_post_render: no file {path} for secretKeyRef {name}/{key}")
    return path.read_text().strip()


def post_render(docs: list[dict[str, Any]], secrets: Path, ports: dict[str, dict[str, int]],
                models: Path | None = None) -> list[dict[str, Any]]:
    out = []
    for doc in docs:
        kind = doc.get("kind")
        if kind in DROPPED:
            continue
        if kind not in PLAYED:
            raise SystemExit(f"kube_play_post_render: unexpected kind {kind}")
        if kind == "Deployment":
            _pod(doc["spec"]["template"]["spec"], doc["metadata"]["name"],
                 doc["metadata"]["labels"]["app.kubernetes.io/component"], secrets, ports, models)
        out.append(doc)
    return out


def _pod(pod: dict[str, Any], deployment: str, service: str, secrets: Path, ports: dict[str, dict[str, int]],
         models: Path | None) -> None:
    renamed = {v["name"]: f"{deployment}-{v['name']}" for v in pod.get("volumes", [])
               if "emptyDir" in v and not (v["name"] == "models" and models is not None)}
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                env.pop("valueFrom")
                env["value"] = _secret_value(secrets, ref["name"], ref["key"])
        for port in container.get("ports", []):
            host_port = ports.get(service, {}).get(port["name"])
            if host_port is None:
                raise SystemExit(f"kube_play_post_render: no host port for {service} {port['name']} "
                                 "(podman would publish it on 0.0.0.0)")
            port["hostIP"] = "127.0.0.1"
            port["hostPort"] = int(host_port)
    for volume in pod.get("volumes", []):
        volume["name"] = renamed.get(volume["name"], volume["name"])
        secret = volume.pop("secret", None)
        if secret is not None:
            directory = secrets / secret["secretName"]
            for item in secret.get("items", []):
                if item["key"] != item["path"] or not (directory / item["key"]).is_file():
                    raise SystemExit(f"kube_play_post_render: {directory} must hold {item['key']} as {item['path']}")
            volume["hostPath"] = {"path": str(directory), "type": "Directory"}
        elif volume["name"] == "models" and models is not None and "emptyDir" in volume:
            volume.pop("emptyDir")
            volume["hostPath"] = {"path": str(models), "type": "Directory"}


def main() -> None:
    secrets = os.environ.get("TENSAFE_KP_SECRETS")
    if not secrets:
        raise SystemExit("kube_play_post_render: set TENSAFE_KP_SECRETS (see the docstring)")
    ports = {k: {n: int(p) for n, p in v.items()} for k, v in
             json.loads(os.environ.get("TENSAFE_KP_PORTS") or "{}").items()}
    models = os.environ.get("TENSAFE_KP_MODELS")
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    sys.stdout.write(yaml.safe_dump_all(post_render(docs, Path(secrets), ports, Path(models) if models else None),
                                        sort_keys=False))


if __name__ == "__main__":
    main()
