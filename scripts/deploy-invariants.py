#!/usr/bin/env python3
"""Cross-file invariants of the deployment files that no schema expresses.

    deploy-invariants.py --k8s RENDERED.yaml [--k8s OVERLAY.yaml ...] --compose docker-compose.yml

Each RENDERED.yaml is `kubectl kustomize` output (deploy/k8s, deploy/overlays/*); messages
name it by its file name. Checks, for Kubernetes and compose: the loader is the single writer
of the model volume (one replica, Recreate; the only read-write mount), probes/health checks hit
each service's own gRPC port, the grace period outlasts LLAMA_AGENT_GRACE_PERIOD, containers are
non-root with a read-only root filesystem and resource limits, metrics annotations match the
metrics port, every scaled Deployment has an HPA and a PDB.
The generator and the embedder either mount the model volume read-only at the same /models (a
ReadWriteMany claim), or, with LLAMA_MODEL_CACHE_DIR set (deploy/overlays/rwo), mount no part of
it and have a writable node-local volume at that directory: an emptyDir on disk whose sizeLimit
exceeds LLAMA_MODEL_CACHE_MAX_SIZE and which the pod requests as ephemeral-storage, or a
prepared hostPath (type Directory) in a namespace whose Pod Security level admits it. A claim
that is not ReadWriteMany is mounted by the loader only.
Prints each violation and exits 1 if there is any.
"""

import argparse
import os
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


def quantity(value):
    """A Kubernetes quantity (`25G`, `18Gi`, `1e9`, `500m`) in bytes; None if it is not one."""
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    m = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)", str(value).strip())
    if not m or m.group(2) not in units:
        return None
    return float(m.group(1)) * units[m.group(2)]


def model_cache_size(value):
    """LLAMA_MODEL_CACHE_MAX_SIZE as the services read it (parse_size, services/common/src/
    options.rs: `20G` and `20GB` are 10^9, `18GiB` 2^30, case-insensitive); None if invalid."""
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
             "T": 1e12, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"([0-9.]+)\s*([a-zA-Z]*)", str(value).strip())
    if not m or m.group(2).upper() not in units:
        return None
    try:
        return float(m.group(1)) * units[m.group(2).upper()]
    except ValueError:
        return None


# Pod Security levels that refuse hostPath volumes (both do).
NO_HOSTPATH = ("restricted", "baseline")
DEFAULT_CACHE_MAX = "20G"


def check_node_cache(where, pod, container, env, cache_dir, claims, namespace):
    """An inference Deployment with LLAMA_MODEL_CACHE_DIR: streamed copies on a node-local volume."""
    need(os.path.isabs(cache_dir) and os.path.normpath(cache_dir) not in ("/", "/tmp"),
         f"{where}: LLAMA_MODEL_CACHE_DIR {cache_dir!r} must be an absolute directory of its own")
    need(not (cache_dir + "/").startswith(MODELS + "/"), f"{where}: LLAMA_MODEL_CACHE_DIR is inside {MODELS}")
    need(env.get("LLAMA_LOADER_ENDPOINT", "").endswith(f"loader:{SERVICES['loader']}"),
         f"{where}: LLAMA_LOADER_ENDPOINT must reach the loader, which streams the models")
    cap = model_cache_size(env.get("LLAMA_MODEL_CACHE_MAX_SIZE", DEFAULT_CACHE_MAX))
    need(cap is not None, f"{where}: LLAMA_MODEL_CACHE_MAX_SIZE is not a size")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for v in volumes.values():
        need(v.get("persistentVolumeClaim", {}).get("claimName") not in claims,
             f"{where}: mounts the loader's claim {v.get('persistentVolumeClaim', {}).get('claimName')}, "
             "but copies models into LLAMA_MODEL_CACHE_DIR")
    need(not any(m["mountPath"] == MODELS for m in container.get("volumeMounts", [])),
         f"{where}: mounts {MODELS}, but copies models into LLAMA_MODEL_CACHE_DIR")

    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == cache_dir.rstrip("/")]
    if not need(len(mounts) == 1, f"{where}: no volume mounted at LLAMA_MODEL_CACHE_DIR {cache_dir} "
                "(the root filesystem is read-only)"):
        return
    need(not mounts[0].get("readOnly", False) and not mounts[0].get("subPath"),
         f"{where}: {cache_dir} must be mounted writable, whole")
    vol = volumes.get(mounts[0]["name"], {})
    if "emptyDir" in vol:
        ed = vol["emptyDir"] or {}
        need(ed.get("medium") != "Memory", f"{where}: {cache_dir} is a memory emptyDir (it would count as RAM)")
        limit = quantity(ed.get("sizeLimit", ""))
        if need(limit is not None, f"{where}: the emptyDir at {cache_dir} has no sizeLimit"):
            need(cap is None or limit > cap,
                 f"{where}: emptyDir sizeLimit {ed['sizeLimit']} leaves no headroom over "
                 f"LLAMA_MODEL_CACHE_MAX_SIZE (past it the kubelet evicts the pod)")
            req = quantity(container.get("resources", {}).get("requests", {}).get("ephemeral-storage", ""))
            need(req is not None and req >= limit,
                 f"{where}: requests.ephemeral-storage is below the cache's sizeLimit {ed['sizeLimit']}")
    elif "hostPath" in vol:
        hp = vol["hostPath"]
        # Directory: prepared for uid 10001 by the operator; DirectoryOrCreate would be root's.
        need(hp.get("type") == "Directory", f"{where}: hostPath {hp.get('path')} must be type Directory")
        level = (namespace or {}).get("metadata", {}).get("labels", {}).get("pod-security.kubernetes.io/enforce")
        need(level not in NO_HOSTPATH,
             f"{where}: hostPath cache in a namespace enforcing Pod Security {level!r}, which refuses it")
    else:
        need(False, f"{where}: {cache_dir} is neither an emptyDir nor a hostPath")


def pod_specs(docs):
    """(kind, name, pod spec) of every object that makes pods."""
    for d in docs:
        spec = d.get("spec") or {}
        if d["kind"] == "Pod":
            yield d["kind"], d["metadata"]["name"], spec
        elif d["kind"] == "CronJob":
            yield d["kind"], d["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]
        elif "template" in spec and "spec" in (spec["template"] or {}):
            yield d["kind"], d["metadata"]["name"], spec["template"]["spec"]


def check_k8s(path):
    label = os.path.splitext(os.path.basename(path))[0]
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
    namespace = next(iter(by_kind.get("Namespace", {}).values()), None)
    # The model volume: the claim(s) the loader mounts at /models.
    claims = set()
    loader = by_kind.get("Deployment", {}).get("loader")
    if loader is not None:
        lpod = loader["spec"]["template"]["spec"]
        named = {v["name"]: v for v in lpod.get("volumes", [])}
        for c in lpod["containers"]:
            for m in c.get("volumeMounts", []):
                if m["mountPath"] == MODELS:
                    claims.add(named.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName"))
    claims.discard(None)

    for name, port in SERVICES.items():
        dep = by_kind.get("Deployment", {}).get(name)
        if not need(dep is not None, f"{label}: no Deployment {name}"):
            continue
        where = f"{label} Deployment {name}"
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
        if need(svc is not None, f"{label}: no Service {name}"):
            need(any(p["port"] == port for p in svc["spec"]["ports"]), f"{label} Service {name}: no port {port}")

        # The OpenAI HTTP front, where a service has one: the listen address, the container
        # port named http and the Service's port agree (an InferencePool targets that port).
        http = env.get(f"LLAMA_{name.upper()}_HTTP_LISTEN")
        if http:
            need(ports.get("http") == port_of(http), f"{where}: containerPort http != LLAMA_{name.upper()}_HTTP_LISTEN")
            if svc is not None:
                need(any(p["name"] == "http" and p["port"] == port_of(http) for p in svc["spec"]["ports"]),
                     f"{label} Service {name}: no http port {port_of(http)}")

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

        # Scaled by an HPA, sheltered by a PDB.
        if name != "loader":
            need("replicas" not in spec, f"{where}: replicas is set, but the HPA owns it")
            hpa = hpas.get(name)
            need(hpa is not None and hpa["spec"]["scaleTargetRef"]["name"] == name, f"{label}: no HPA for Deployment {name}")
            sel = spec["selector"]["matchLabels"]
            need(any(p["spec"]["selector"].get("matchLabels") == sel for p in pdbs.values()), f"{label}: no PDB for Deployment {name}")

        # Models: streamed into a node-local cache, or the loader's volume at the same path.
        cache_dir = env.get("LLAMA_MODEL_CACHE_DIR")
        if name != "loader" and cache_dir:
            check_node_cache(where, pod, container, env, cache_dir, claims, namespace)
            continue
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == MODELS]
        if not need(len(mounts) == 1, f"{where}: no volume mounted at {MODELS} (nor LLAMA_MODEL_CACHE_DIR set)"):
            continue
        vol = volumes.get(mounts[0]["name"], {})
        claim = vol.get("persistentVolumeClaim", {}).get("claimName")
        need(claim in pvcs, f"{where}: {MODELS} is not a PersistentVolumeClaim of this kustomization")
        ro = mounts[0].get("readOnly", False)
        if name == "loader":
            need(not ro, f"{where}: the loader must mount {MODELS} read-write")
            need(env.get("LLAMA_CACHE_DIR") == MODELS, f"{where}: LLAMA_CACHE_DIR is not {MODELS}")
            need(spec.get("replicas") == 1, f"{where}: the single writer needs replicas: 1")
            need(spec.get("strategy", {}).get("type") == "Recreate", f"{where}: the single writer needs strategy Recreate")
        else:
            need(ro and vol["persistentVolumeClaim"].get("readOnly") is True, f"{where}: {MODELS} must be mounted read-only")

    # Every other pod that mounts the loader's claim: read-only, and only on a ReadWriteMany
    # claim (a ReadWriteOnce one would pin it to the loader's node, or leave it Pending).
    for claim in claims & set(pvcs):
        readers = []
        for kind, name, pod in pod_specs(docs):
            if (kind, name) == ("Deployment", "loader"):
                continue
            for v in pod.get("volumes", []):
                if v.get("persistentVolumeClaim", {}).get("claimName") == claim:
                    readers.append(f"{kind} {name}")
                    need(v["persistentVolumeClaim"].get("readOnly") is True,
                         f"{label} {kind} {name}: mounts the model volume {claim} writable")
        if readers:
            need("ReadWriteMany" in pvcs[claim]["spec"].get("accessModes", []),
                 f"{label} PVC {claim}: not ReadWriteMany, but mounted by {', '.join(readers)} besides the loader")


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
    ap.add_argument("--k8s", required=True, action="append",
                    help="rendered kustomize output (repeatable: the base and each overlay)")
    ap.add_argument("--compose", required=True, help="the main compose file")
    args = ap.parse_args()
    for path in args.k8s:
        check_k8s(path)
    check_compose(args.compose)
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
