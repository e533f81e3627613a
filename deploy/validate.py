#!/usr/bin/env python3
"""Checks deploy/ without a cluster: every manifest parses as YAML and the pieces agree.

    python3 deploy/validate.py        # needs PyYAML (pip install pyyaml)

It cannot check that the images build or that Kubernetes accepts the objects (that needs
Docker with registry access and a cluster with Knative); it checks what a typo would break:
- every Knative Service of a stage scales to zero, sets a target concurrency, names its port
  h2c, has a memory limit, takes S3 credentials from a Secret and never inlines them;
- the coordinator's endpoints file names exactly the stages that have a Knative Service;
- every Secret and ConfigMap a workload references is defined or documented;
- every Dockerfile target the README and manifests use exists, builds with --locked, and
  its runtime image runs as a non-root user.
"""

import re
import sys
import tomllib
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
problems = []


def problem(message):
    problems.append(message)


def load_manifests():
    objects = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as error:
            problem(f"{path.name}: not valid YAML: {error}")
            continue
        for doc in docs:
            for field in ("apiVersion", "kind", "metadata"):
                if field not in doc:
                    problem(f"{path.name}: an object has no {field}")
            objects.append((path.name, doc))
    return objects


def containers(doc):
    spec = doc.get("spec", {})
    template = spec.get("template", {}).get("spec", {})
    return template.get("containers", []), template


def check_stage(name, doc):
    annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("autoscaling.knative.dev/min-scale") != "0":
        problem(f"{name}: min-scale is not \"0\" (no scale to zero)")
    if "autoscaling.knative.dev/target" not in annotations:
        problem(f"{name}: no target concurrency annotation")
    (container, *_), template = containers(doc)
    ports = container.get("ports", [])
    if [p.get("name") for p in ports] != ["h2c"]:
        problem(f"{name}: the container port is not named h2c")
    if not container.get("resources", {}).get("limits", {}).get("memory"):
        problem(f"{name}: no memory limit")
    if any(e.get("name", "").startswith("AWS_") and "value" in e for e in container.get("env", [])):
        problem(f"{name}: S3 credentials inlined instead of taken from a Secret")
    if not any("secretRef" in e for e in container.get("envFrom", [])):
        problem(f"{name}: S3 credentials do not come from a Secret")
    args = container.get("args", [])
    if "--danger-h2c-loopback" in args:
        listen = args[args.index("--listen") + 1] if "--listen" in args else ""
        if not listen.startswith("127.0.0.1:"):
            problem(f"{name}: h2c must listen on loopback, not {listen!r}")
        if listen.split(":")[-1] != str(ports[0].get("containerPort")):
            problem(f"{name}: --listen {listen} is not the h2c containerPort")
    model = args[args.index("--model") + 1]
    stage = int(args[args.index("--stage") + 1])
    store = args[args.index("--store") + 1]
    if not store.startswith("s3://"):
        problem(f"{name}: the shard store is not S3")
    return (model, stage)


def referenced(doc, kind):
    """Names of Secrets (kind='secret') or ConfigMaps (kind='configMap') a workload uses."""
    found = set()
    conts, template = containers(doc)
    for volume in template.get("volumes", []):
        if kind == "secret" and "secret" in volume:
            found.add(volume["secret"]["secretName"])
        if kind == "configMap" and "configMap" in volume:
            found.add(volume["configMap"]["name"])
    for container in conts:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get(f"{kind}KeyRef")
            if ref:
                found.add(ref["name"])
        for env in container.get("envFrom", []):
            ref = env.get(f"{kind}Ref")
            if ref:
                found.add(ref["name"])
    return found


def check_manifests():
    objects = load_manifests()
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in objects}
    documented = (DEPLOY / "k8s" / "10-secrets.example.yaml").read_text()
    stages = {}
    endpoints = None
    for _, doc in objects:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if doc["apiVersion"].startswith("serving.knative.dev/") and kind == "Service":
            stages[check_stage(name, doc)] = name
        if kind == "ConfigMap" and name == "shardseal-endpoints":
            endpoints = tomllib.loads(doc["data"]["endpoints.toml"])["endpoint"]
        if kind in ("Deployment", "DaemonSet") or doc["apiVersion"].startswith("serving"):
            for secret in referenced(doc, "secret"):
                if ("Secret", secret) not in defined and secret not in documented:
                    problem(f"{name}: Secret {secret} is neither defined nor documented")
            for config in referenced(doc, "configMap"):
                if ("ConfigMap", config) not in defined:
                    problem(f"{name}: ConfigMap {config} is not defined")
    if endpoints is None:
        problem("no shardseal-endpoints ConfigMap for the coordinator")
        return
    routed = {}
    for e in endpoints:
        host = re.match(r"https?://([^./:]+)\.shardseal\.svc", e["url"])
        routed[(e["model"], e["stage"])] = host.group(1) if host else None
    if set(routed) != set(stages):
        problem(f"endpoints {sorted(routed)} differ from the Knative stages {sorted(stages)}")
    for key, service in routed.items():
        if key in stages and stages[key] != service:
            problem(f"endpoint of {key} points at {service}, the stage is {stages[key]}")


def check_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE)
    for needed in ("build", "function", "coordinator", "broker", "quoting-agent"):
        if needed not in targets:
            problem(f"Dockerfile: no {needed} target")
    if "cargo build --release --locked" not in text:
        problem("Dockerfile: the build is not `cargo build --release --locked`")
    runtime_targets = [t for t in targets if t != "build"]
    # Each runtime stage, as text from its FROM to the next.
    stages = re.split(r"^FROM\s", text, flags=re.MULTILINE)[1:]
    for target, body in zip(targets, stages):
        if target in runtime_targets and not re.search(r"^USER\s+[1-9]", body, re.MULTILINE):
            problem(f"Dockerfile: target {target} does not run as a non-root user")
    readme = (DEPLOY / "README.md").read_text()
    for used in set(re.findall(r"--target\s+([a-z][a-z-]*)", readme)):
        if used not in targets:
            problem(f"README: --target {used} is not in the Dockerfile")


check_manifests()
check_dockerfile()
if problems:
    print("\n".join(f"deploy: {p}" for p in problems))
    sys.exit(1)
print("deploy: manifests parse and agree; Dockerfile targets and users are consistent")
