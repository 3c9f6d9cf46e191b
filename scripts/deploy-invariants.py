#!/usr/bin/env python3
"""Cross-file invariants of the deployment files that no schema expresses.

    deploy-invariants.py --k8s RENDERED.yaml --compose docker-compose.yml

RENDERED.yaml is `kubectl kustomize deploy/k8s` output. Checks, for Kubernetes and compose:
the loader is the single writer of the model volume (one replica, Recreate; the only
read-write mount), the generator and the embedder mount it read-only at the same /models,
probes/health checks hit each service's own gRPC port, the grace period outlasts
LLAMA_AGENT_GRACE_PERIOD, containers are non-root with a read-only root filesystem and resource
limits, metrics annotations match the metrics port, every scaled Deployment has an HPA and a PDB.
Prints each violation and exits 1 if there is any.
"""

import argparse
import re
import sys

import yaml

SERVICES = {"loader": 50051, "generator": 50052, "embedder": 50053}
MODELS = "/models"
errors = []


def need(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def seconds(value):
    """Compose durations (`40s`, `1m30s`, `10m`) or plain numbers, in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value))
    return sum(float(n) * units[u] for n, u in parts)


def port_of(listen):
    return int(str(listen).rsplit(":", 1)[1])


def check_k8s(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    config = {
        name: cm.get("data", {}) for name, cm in by_kind.get("ConfigMap", {}).items()
    }
    pvcs = by_kind.get("PersistentVolumeClaim", {})
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    pdbs = by_kind.get("PodDisruptionBudget", {})
    services = by_kind.get("Service", {})

    for name, port in SERVICES.items():
        dep = by_kind.get("Deployment", {}).get(name)
        if not need(dep is not None, f"k8s: no Deployment {name}"):
            continue
        where = f"k8s Deployment {name}"
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        env = {}
        for ref in container.get("envFrom", []):
            env.update(config.get(ref.get("configMapRef", {}).get("name"), {}))
        for e in container.get("env", []):
            env[e["name"]] = e.get("value", "<from secret>")

        # Ports: the listen address, the container port named grpc, the probes, the Service.
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        listen = env.get(f"LLAMA_{name.upper()}_LISTEN")
        need(listen and port_of(listen) == port, f"{where}: LLAMA_{name.upper()}_LISTEN is {listen}, want port {port}")
        need(ports.get("grpc") == port, f"{where}: containerPort grpc is {ports.get('grpc')}, want {port}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = container.get(probe, {})
            need(p.get("grpc", {}).get("port") == port, f"{where}: {probe} is not a gRPC probe on {port}")
        svc = services.get(name)
        if need(svc is not None, f"k8s: no Service {name}"):
            need(any(p["port"] == port for p in svc["spec"]["ports"]), f"k8s Service {name}: no port {port}")

        # The OpenAI HTTP front, where a service has one: the listen address, the container
        # port named http and the Service's port agree (an InferencePool targets that port).
        http = env.get(f"LLAMA_{name.upper()}_HTTP_LISTEN")
        if http:
            need(ports.get("http") == port_of(http), f"{where}: containerPort http != LLAMA_{name.upper()}_HTTP_LISTEN")
            if svc is not None:
                need(any(p["name"] == "http" and p["port"] == port_of(http) for p in svc["spec"]["ports"]),
                     f"k8s Service {name}: no http port {port_of(http)}")

        # Metrics: the listen address, the container port, the scrape annotations.
        metrics = env.get("LLAMA_AGENT_METRICS_LISTEN")
        ann = spec["template"]["metadata"].get("annotations", {})
        if need(metrics, f"{where}: LLAMA_AGENT_METRICS_LISTEN unset"):
            need(ports.get("metrics") == port_of(metrics), f"{where}: containerPort metrics != LLAMA_AGENT_METRICS_LISTEN")
            need(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(port_of(metrics)),
                 f"{where}: prometheus.io annotations do not match the metrics port")

        # Shutdown: Kubernetes waits longer than the service drains.
        grace = float(env.get("LLAMA_AGENT_GRACE_PERIOD", 30))
        need(pod.get("terminationGracePeriodSeconds", 30) > grace,
             f"{where}: terminationGracePeriodSeconds <= LLAMA_AGENT_GRACE_PERIOD ({grace:g})")

        # Hardening and resources.
        need(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
        sc = container.get("securityContext", {})
        need(sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable")
        need(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false")
        res = container.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                need(r in res.get(kind, {}), f"{where}: no {kind}.{r}")

        # The model volume: same claim, same path; read-write for the loader only.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == MODELS]
        if not need(len(mounts) == 1, f"{where}: no volume mounted at {MODELS}"):
            continue
        vol = volumes.get(mounts[0]["name"], {})
        claim = vol.get("persistentVolumeClaim", {}).get("claimName")
        pvc = pvcs.get(claim)
        if need(pvc is not None, f"{where}: {MODELS} is not a PersistentVolumeClaim of this kustomization"):
            need("ReadWriteMany" in pvc["spec"].get("accessModes", []), f"k8s PVC {claim}: not ReadWriteMany")
        ro = mounts[0].get("readOnly", False)
        if name == "loader":
            need(not ro, f"{where}: the loader must mount {MODELS} read-write")
            need(env.get("LLAMA_CACHE_DIR") == MODELS, f"{where}: LLAMA_CACHE_DIR is not {MODELS}")
            need(spec.get("replicas") == 1, f"{where}: the single writer needs replicas: 1")
            need(spec.get("strategy", {}).get("type") == "Recreate", f"{where}: the single writer needs strategy Recreate")
        else:
            need(ro and vol["persistentVolumeClaim"].get("readOnly") is True, f"{where}: {MODELS} must be mounted read-only")
            need("replicas" not in spec, f"{where}: replicas is set, but the HPA owns it")
            hpa = hpas.get(name)
            need(hpa is not None and hpa["spec"]["scaleTargetRef"]["name"] == name, f"k8s: no HPA for Deployment {name}")
            sel = spec["selector"]["matchLabels"]
            need(any(p["spec"]["selector"].get("matchLabels") == sel for p in pdbs.values()), f"k8s: no PDB for Deployment {name}")


def check_compose(path):
    doc = yaml.safe_load(open(path))
    svcs = doc.get("services", {})
    volume_source = None
    for name, port in SERVICES.items():
        s = svcs.get(name)
        if not need(s is not None, f"{path}: no service {name}"):
            continue
        where = f"{path} {name}"
        env = s.get("environment", {})
        need(isinstance(env, dict), f"{where}: environment must be a mapping")
        listen = env.get(f"LLAMA_{name.upper()}_LISTEN", f"0.0.0.0:{port}")
        need(port_of(listen) == port, f"{where}: listens on {listen}, want port {port}")
        test = s.get("healthcheck", {}).get("test", [])
        need("/usr/local/bin/llama-health" in test and f"http://127.0.0.1:{port}" in test,
             f"{where}: healthcheck is not llama-health on port {port}")
        grace = float(env.get("LLAMA_AGENT_GRACE_PERIOD", 30))
        need(seconds(s.get("stop_grace_period", "10s")) > grace, f"{where}: stop_grace_period <= LLAMA_AGENT_GRACE_PERIOD")
        limits = s.get("deploy", {}).get("resources", {}).get("limits", {})
        need("cpus" in limits and "memory" in limits, f"{where}: no cpus/memory limits")
        need(s.get("read_only") is True, f"{where}: root filesystem is writable")
        for key in ("LLAMA_AGENT_TOKEN", "HF_TOKEN"):
            need(env.get(key) is None or str(env[key]).startswith("${"),
                 f"{where}: {key} must come from the host, not be written here")

        mounts = [v for v in s.get("volumes", []) if isinstance(v, str) and v.split(":")[1] == MODELS]
        if not need(len(mounts) == 1, f"{where}: no volume mounted at {MODELS}"):
            continue
        parts = mounts[0].split(":")
        volume_source = volume_source or parts[0]
        need(parts[0] == volume_source and parts[0] in doc.get("volumes", {}),
             f"{where}: {MODELS} is not the shared named volume {volume_source}")
        ro = len(parts) > 2 and "ro" in parts[2].split(",")
        if name == "loader":
            need(not ro, f"{where}: the loader must mount {MODELS} read-write")
            need(env.get("LLAMA_CACHE_DIR") == MODELS, f"{where}: LLAMA_CACHE_DIR is not {MODELS}")
        else:
            need(ro, f"{where}: {MODELS} must be mounted read-only (:ro)")
            dep = s.get("depends_on", {}).get("loader", {})
            need(dep.get("condition") == "service_healthy", f"{where}: must depend on a healthy loader")
            endpoint = env.get("LLAMA_LOADER_ENDPOINT", "")
            need(endpoint.endswith(f"loader:{SERVICES['loader']}"), f"{where}: LLAMA_LOADER_ENDPOINT is {endpoint!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k8s", required=True, help="rendered kustomize output")
    ap.add_argument("--compose", required=True, help="the main compose file")
    args = ap.parse_args()
    check_k8s(args.k8s)
    check_compose(args.compose)
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
