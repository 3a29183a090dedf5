#!/usr/bin/env python3
"""Checks of manifests/ that schemas cannot make, run by scripts/check-manifests (which also runs
kubernetes-validate, promtool and hadolint). Needs PyYAML and jsonschema (the CI venv has both).

    check-manifests.py [--server-help FILE] [--client-help FILE] [--metrics-sample FILE]
                       [--client-metrics-sample FILE]
    check-manifests.py --update      # regenerate monitoring/grafana-dashboard.yaml from the JSON
    check-manifests.py --node-tuning-out DIR   # the server Deployments with node-tuning/'s patch

--server-help/--client-help: the binaries' --help output, to check that every WEBSOCKET_TEST_*
variable the manifests set is one the binary reads. --metrics-sample, --client-metrics-sample: a
scrape of the server's and of the client's /metrics, to check that every metric the alerts and
the dashboard use exists.
"""
import argparse
import copy
import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
MONITORING = MANIFESTS / "monitoring"
WSS = MANIFESTS / "wss"
CERT_MANAGER = WSS / "cert-manager"
NETWORK_POLICIES = MANIFESTS / "network-policies"
LOAD_TEST = MANIFESTS / "load-test"
NODE_TUNING_PATCH = MANIFESTS / "node-tuning" / "max-map-count.patch.yaml"
DASHBOARD_JSON = MONITORING / "dashboards" / "websocket-test.json"
DASHBOARD_CONFIGMAP = MONITORING / "grafana-dashboard.yaml"
SERVICE = "websocket-test-server"
# The Prometheus job labels the PodMonitors set and the alerts and the dashboard select.
JOB = "websocket-test-server"
CLIENT_JOB = "websocket-test-client"
# The load-test Job's pods: app.kubernetes.io/component=load-client, not client, so the client
# Deployment's selector does not match them; the client PodMonitor and NetworkPolicy pick both.
LOAD_JOB = "websocket-test-load"
LOAD_COMPONENT = "load-client"
# Metrics renamed in the binaries: no query may use the old name.
RENAMED_METRICS = {"websocket_connections_total": "websocket_connections_opened_total"}
IMAGES = {"server": "ghcr.io/websocket-test/server", "client": "ghcr.io/websocket-test/client"}
# Defaults of the binaries (src/config.rs) where the manifests leave a flag unset.
DEFAULTS = {"WEBSOCKET_TEST_PORT": "3003", "WEBSOCKET_TEST_METRICS_PORT": "9100",
            "WEBSOCKET_TEST_SHUTDOWN_TIMEOUT": "5s", "WEBSOCKET_TEST_PATH": "/ws"}
# After the shutdown timeout the server waits this long for aborted connections (src/server).
ABORT_GRACE_S = 1
MEMORY_PER_CONNECTION_KIB = int(os.environ.get("MEMORY_PER_CONNECTION_KIB", "64"))
# Memory the server needs beside its connections: the process at rest and messages in flight.
MEMORY_HEADROOM_MIB = 64
# What the client's load mode (--message-size) adds per connection: measured 221 KiB resident
# (2,000 connections of the static client, 12 KiB each while only holding), most of it each
# connection's round-trip histogram.
MEMORY_LOAD_MODE_KIB = int(os.environ.get("MEMORY_LOAD_MODE_KIB", "256"))
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1"}
REQUIRED_ALERTS = {"WebSocketTestNoConnections", "WebSocketTestTooManyConnections",
                   "WebSocketTestMetricsDown", "WebSocketTestClientNotConnected",
                   "WebSocketTestClientConnectionsLost", "WebSocketTestClientConnectionsDiedSilent"}

failures = []
passes = 0


def check(condition, message):
    global passes
    if condition:
        passes += 1
    else:
        failures.append(message)
    return condition


def version():
    match = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    return match.group(1)


def load(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        doc["__file"] = str(path.relative_to(ROOT))
    return docs


def where(doc):
    return f'{doc["__file"]}: {doc["kind"]} {doc["metadata"]["name"]}'


def selects(selector, labels):
    """matchLabels only: the workloads' own selectors use no matchExpressions (checked)."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def selects_pods(selector, labels):
    """A whole LabelSelector (matchLabels and matchExpressions, as PodMonitors and NetworkPolicies
    may use) against pod labels; an empty selector selects nothing here (it would select all)."""
    expressions = selector.get("matchExpressions", [])
    if not selector.get("matchLabels") and not expressions:
        return False
    if not all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in expressions:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:
            return False
    return True


def parse_duration_s(text):
    """The binaries' duration syntax: 200ms, 15s, 5m, 1h, or bare seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(text).strip())
    if not match:
        raise ValueError(f"bad duration {text!r}")
    number, unit = int(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def quantity_bytes(text):
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|k|M|G)?", str(text))
    factor = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}
    return int(match.group(1)) * factor[match.group(2)]


def quantity_cpu(text):
    text = str(text)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def settings(container):
    """The container's WEBSOCKET_TEST_* settings: env, then args (a flag wins, as in the binary)."""
    values = dict(DEFAULTS)
    for env in container.get("env", []):
        check("valueFrom" not in env or env["name"] not in DEFAULTS,
              f'{container["name"]}: {env["name"]} must be a literal value to be checked')
        values[env["name"]] = str(env.get("value", ""))
    args = container.get("args", [])
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if not value and i + 1 < len(args):
                value = args[i + 1]
            values["WEBSOCKET_TEST_" + name.upper().replace("-", "_")] = value
    return values


def container_port(container, ref):
    """The containerPort that a Service targetPort or probe port (name or number) names."""
    for port in container.get("ports", []):
        if ref in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    return None


# --- Schemas of the two Prometheus-operator kinds, for the fields these manifests may use ----
# (kubernetes-validate has no schemas for custom resources; field names as in the operator's
# monitoring.coreos.com/v1 CRDs; unknown fields are errors, as with --strict).
DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": STRING_MAP, "annotations": STRING_MAP}}
LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": STRING_MAP,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
        "properties": {"key": {"type": "string"},
                       "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}
RELABEL = {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                        "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                        "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                        "dropequal", "DropEqual"]},
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
    "modulus": {"type": "integer", "minimum": 1}, "replacement": {"type": "string"}}}}
PODMONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": LABEL_SELECTOR, "jobLabel": {"type": "string"},
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                     "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                     "sampleLimit": {"type": "integer", "minimum": 0},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "properties": {
                             "port": {"type": "string"}, "portNumber": {"type": "integer"},
                             "path": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
                             "interval": DURATION, "scrapeTimeout": DURATION,
                             "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                             "enableHttp2": {"type": "boolean"}, "followRedirects": {"type": "boolean"},
                             "filterRunning": {"type": "boolean"},
                             "params": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                             "relabelings": RELABEL, "metricRelabelings": RELABEL}}}}}}}
RULE = {"type": "object", "required": ["expr"], "additionalProperties": False,
        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
        "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                       "expr": {"type": ["string", "integer"]}, "for": DURATION, "keep_firing_for": DURATION,
                       "labels": STRING_MAP, "annotations": STRING_MAP}}
PROMETHEUSRULE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": DURATION,
                               "limit": {"type": "integer"}, "labels": STRING_MAP,
                               "rules": {"type": "array", "minItems": 1, "items": RULE}}}}}}}}
CRD_SCHEMAS = {"PodMonitor": PODMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}

# cert-manager's Issuer and Certificate (cert-manager.io/v1), the fields the example may use.
ISSUER_REF = {"type": "object", "required": ["name"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                             "group": {"const": "cert-manager.io"}}}
CERTIFICATE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"}, "kind": {"const": "Certificate"}, "metadata": METADATA,
        "spec": {"type": "object", "required": ["secretName", "issuerRef"], "additionalProperties": False,
                 "anyOf": [{"required": ["dnsNames"]}, {"required": ["commonName"]}, {"required": ["ipAddresses"]}],
                 "properties": {
                     "secretName": {"type": "string"}, "issuerRef": ISSUER_REF, "isCA": {"type": "boolean"},
                     "commonName": {"type": "string", "maxLength": 64},
                     "dnsNames": {"type": "array", "items": {"type": "string"}},
                     "ipAddresses": {"type": "array", "items": {"type": "string"}},
                     "duration": {"type": "string", "pattern": r"^([0-9]+(h|m|s))+$"},
                     "renewBefore": {"type": "string", "pattern": r"^([0-9]+(h|m|s))+$"},
                     "usages": {"type": "array", "items": {"enum": [
                         "signing", "digital signature", "content commitment", "key encipherment",
                         "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
                         "decipher only", "any", "server auth", "client auth", "code signing",
                         "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
                         "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}},
                     "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                         "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                         "encoding": {"enum": ["PKCS1", "PKCS8"]},
                         "rotationPolicy": {"enum": ["Never", "Always"]}}}}}}}
ISSUER_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"}, "kind": {"const": "Issuer"}, "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                 "properties": {"selfSigned": {"type": "object", "additionalProperties": False},
                                "ca": {"type": "object", "required": ["secretName"], "additionalProperties": False,
                                       "properties": {"secretName": {"type": "string"}}}}}}}
CERT_MANAGER_SCHEMAS = {"Certificate": CERTIFICATE_SCHEMA, "Issuer": ISSUER_SCHEMA}

# manifests/node-tuning/'s patch adds this init container to the server Deployment, and nothing
# else. It is the one container of the manifests allowed to run privileged and as root (a
# writable /proc/sys for a node-wide sysctl), so the exception is as narrow as it can be: this
# command, this securityContext, a small image pinned by version.
NODE_TUNING_COMMAND = ["sh", "-c", 'test "$(sysctl -n vm.max_map_count)" -ge 262144 || sysctl -w vm.max_map_count=262144']
NODE_TUNING_SECURITY = {"privileged": True, "runAsUser": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": True}
NODE_TUNING_IMAGE = re.compile(r"^docker\.io/library/busybox:\d+\.\d+\.\d+$")

# The wss variant (manifests/wss/) is manifests/ plus exactly these (check_wss strips them and
# compares): the TLS variables, the volumes that hold their files, the fsGroup that makes the
# key readable, and the Service port's appProtocol.
TLS_SECRET = "websocket-test-server-tls"
TRUST_CONFIGMAP = "websocket-test-trust"
TLS_ENV = {"server": {"WEBSOCKET_TEST_TLS_CERT", "WEBSOCKET_TEST_TLS_KEY", "WEBSOCKET_TEST_TLS_CLIENT_CA"},
           "client": {"WEBSOCKET_TEST_TLS", "WEBSOCKET_TEST_CA_FILE", "WEBSOCKET_TEST_NO_BUILTIN_ROOTS",
                      "WEBSOCKET_TEST_CLIENT_CERT", "WEBSOCKET_TEST_CLIENT_KEY", "WEBSOCKET_TEST_TLS_SERVER_NAME"}}
# Where Prometheus runs, for the metrics port's NetworkPolicy rule.
MONITORING_NAMESPACE = "monitoring"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
DNS_PEER = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


def body(doc):
    return {k: v for k, v in doc.items() if k != "__file"}


def first_difference(a, b, path="."):
    """Where two parsed YAML trees first differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}{key} only in {'the variant' if key in a else 'manifests/'}"
            found = first_difference(a[key], b[key], f"{path}{key}.")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path[:-1]}: {len(a)} items, not {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}{i}.")
            if found:
                return found
        return None
    return None if a == b else f"{path[:-1]}: {a!r}, not {b!r}"


def strip_tls(doc, role):
    """`doc` of the wss variant without what TLS adds (see TLS_ENV)."""
    doc = copy.deepcopy(body(doc))
    if doc["kind"] == "Deployment":
        pod = doc["spec"]["template"]["spec"]
        pod.pop("volumes", None)
        pod.get("securityContext", {}).pop("fsGroup", None)
        for container in pod["containers"]:
            container.pop("volumeMounts", None)
            container["env"] = [e for e in container.get("env", []) if e["name"] not in TLS_ENV[role]]
    if doc["kind"] == "Service":
        for port in doc["spec"]["ports"]:
            if port.get("appProtocol") == "kubernetes.io/wss":
                port["appProtocol"] = "kubernetes.io/ws"
    return doc


def mounted_file(pod, container, path, what):
    """The volume mount, volume and key inside it that hold file `path` of `container`."""
    mounts = [m for m in container.get("volumeMounts", []) if str(path).startswith(m["mountPath"].rstrip("/") + "/")]
    if not check(len(mounts) == 1, f"{what}: {path} is not in (exactly) one volume mount"):
        return None, None, None
    mount = mounts[0]
    check(mount.get("readOnly") is True, f"{what}: the volume at {mount['mountPath']} must be mounted readOnly")
    check("subPath" not in mount and "subPathExpr" not in mount,
          f"{what}: {mount['mountPath']}: no subPath: a subPath mount never sees a renewed Secret or ConfigMap")
    volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), None)
    if not check(volume is not None, f"{what}: no volume {mount['name']}"):
        return mount, None, None
    relative = str(path)[len(mount["mountPath"].rstrip("/")) + 1:]
    source = volume.get("secret") or volume.get("configMap") or {}
    items = {item["path"]: item["key"] for item in source.get("items", [])}
    key = items.get(relative, relative if not items else None)
    return mount, volume, key


def readable_by_pod(mode, pod):
    """Whether files of a Secret/ConfigMap volume with `mode` (owner root) are readable by the pod's user."""
    psc = pod.get("securityContext", {})
    return bool(mode & 0o004) or bool(mode & 0o040 and psc.get("fsGroup") == psc.get("runAsGroup"))


def check_wss(plain, wss_docs, certificates, env_known):
    """manifests/wss/: manifests/ plus TLS, and the TLS wiring: Secret and ConfigMap volumes
    mounted read-only, the files the variables name present in them, the key not world-readable,
    the certificate naming what the client connects to."""
    plain_by_name = {(d["kind"], d["metadata"]["name"]): d for d in plain}
    wss_by_name = {(d["kind"], d["metadata"]["name"]): d for d in wss_docs}
    check(set(wss_by_name) == set(plain_by_name),
          f"wss/: objects {sorted(wss_by_name)} != manifests/'s {sorted(plain_by_name)}")
    for name, doc in wss_by_name.items():
        if name in plain_by_name:
            role = "client" if doc["metadata"]["name"].endswith("-client") else "server"
            diff = first_difference(strip_tls(doc, role), body(plain_by_name[name]))
            check(diff is None, f"{where(doc)}: differs from manifests/ beyond TLS: {diff}")
    server = wss_by_name.get(("Deployment", "websocket-test-server"))
    client = wss_by_name.get(("Deployment", "websocket-test-client"))
    service = wss_by_name.get(("Service", SERVICE))
    if not (server and client and service):
        return
    for deployment, role in ((server, "server"), (client, "client")):
        for env in deployment["spec"]["template"]["spec"]["containers"][0].get("env", []):
            if role in env_known and env["name"] in TLS_ENV[role]:
                check(env["name"] in env_known[role], f"{where(deployment)}: {role} does not read {env['name']} (not in its --help)")

    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    values = settings(container)
    what = f"{where(server)} container {container['name']}"
    for variable, key in (("WEBSOCKET_TEST_TLS_CERT", "tls.crt"), ("WEBSOCKET_TEST_TLS_KEY", "tls.key")):
        path = values.get(variable)
        if not check(path and path.startswith("/"), f"{what}: {variable} must be an absolute path"):
            continue
        mount, volume, found = mounted_file(pod, container, path, what)
        if volume is None:
            continue
        secret = volume.get("secret")
        if not check(secret is not None and secret.get("secretName") == TLS_SECRET,
                     f"{what}: {variable} must come from a secret volume of {TLS_SECRET}"):
            continue
        check(found == key, f"{what}: {variable}={path} is key {found!r} of {TLS_SECRET}; a kubernetes.io/tls Secret has it as {key}")
        mode = secret.get("defaultMode", 0o644)
        check(readable_by_pod(mode, pod), f"{what}: {TLS_SECRET} files (mode {mode:o}, owner root) are not readable by user "
                                          f"{pod.get('securityContext', {}).get('runAsUser')}: set fsGroup = runAsGroup, or mode 0444")
        if key == "tls.key":
            check(not mode & 0o007, f"{what}: the private key must not be world-readable (defaultMode {mode:o})")
    ws_port = next((p for p in service["spec"]["ports"] if p.get("name") == "websocket"), {})
    check(ws_port.get("appProtocol") == "kubernetes.io/wss", f"{where(service)}: the websocket port's appProtocol must be kubernetes.io/wss")

    cpod = client["spec"]["template"]["spec"]
    ccontainer = cpod["containers"][0]
    cvalues = settings(ccontainer)
    what = f"{where(client)} container {ccontainer['name']}"
    check(cvalues.get("WEBSOCKET_TEST_TLS") == "true", f"{what}: WEBSOCKET_TEST_TLS must be \"true\"")
    ca_file = cvalues.get("WEBSOCKET_TEST_CA_FILE")
    if check(ca_file, f"{what}: WEBSOCKET_TEST_CA_FILE must name the CA certificate"):
        mount, volume, found = mounted_file(cpod, ccontainer, ca_file, what)
        if volume is not None:
            check(volume.get("configMap", {}).get("name") == TRUST_CONFIGMAP and found == "ca.crt",
                  f"{what}: WEBSOCKET_TEST_CA_FILE must be key ca.crt of the ConfigMap {TRUST_CONFIGMAP}")
            mode = volume.get("configMap", {}).get("defaultMode", 0o644)
            check(readable_by_pod(mode, cpod), f"{what}: {TRUST_CONFIGMAP} files (mode {mode:o}) are not readable by the client")
    check(not any(v.get("secret", {}).get("secretName") == TLS_SECRET for v in cpod.get("volumes", [])),
          f"{what}: the client must not mount the server's Secret (its private key)")

    # --- cert-manager (optional example) -----------------------------------------------------
    for doc in certificates:
        schema = CERT_MANAGER_SCHEMAS.get(doc["kind"])
        if check(schema is not None, f"{where(doc)}: only Issuer and Certificate expected"):
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(body(doc)), key=str)
            check(not errors, f"{where(doc)}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors))
    issuers = {d["metadata"]["name"]: d for d in certificates if d["kind"] == "Issuer"}
    certs = [d for d in certificates if d["kind"] == "Certificate"]
    for cert in certs:
        ref = cert["spec"]["issuerRef"]
        check(ref.get("kind", "Issuer") != "Issuer" or ref["name"] in issuers,
              f"{where(cert)}: issuerRef names Issuer {ref['name']}, which the file does not define")
    for issuer in issuers.values():
        ca = issuer["spec"].get("ca")
        if ca:
            check(any(c["spec"]["secretName"] == ca["secretName"] and c["spec"].get("isCA") for c in certs),
                  f"{where(issuer)}: its CA Secret {ca['secretName']} comes from no isCA Certificate")
    if certificates:
        serving = [c for c in certs if c["spec"]["secretName"] == TLS_SECRET]
        if check(len(serving) == 1, f"{CERT_MANAGER.relative_to(ROOT)}: one Certificate must write the Secret {TLS_SECRET}"):
            spec = serving[0]["spec"]
            check(cvalues.get("WEBSOCKET_TEST_HOST") in spec.get("dnsNames", []),
                  f"{where(serving[0])}: dnsNames must hold {cvalues.get('WEBSOCKET_TEST_HOST')}, the name the client checks")
            check("server auth" in spec.get("usages", ["server auth"]), f"{where(serving[0])}: usages must include server auth")
            check(not spec.get("isCA"), f"{where(serving[0])}: the server's certificate must not be a CA")


def resolve_port(container, port):
    """A NetworkPolicy port (name or number) as the container port it means, or None."""
    return container_port(container, port)


def check_network_policies(policies, deployments, service, label, load_job=None):
    """manifests/network-policies/ against the Deployments of `label` (manifests/ or wss/) and the
    load-test Job: the selectors pick the server pods, or the client pods of both the client
    Deployment and the Job; the ports are the pods' own; and nothing but the design's traffic is
    allowed (see the file's header)."""
    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    server = deployments["websocket-test-server"]["spec"]["template"]["spec"]["containers"][0]
    client = deployments["websocket-test-client"]["spec"]["template"]["spec"]["containers"][0]
    load_labels = load_job["spec"]["template"]["metadata"]["labels"] if load_job else None
    by_role = {}
    for policy in policies:
        what = f"{where(policy)} ({label})"
        spec = policy["spec"]
        selector = spec.get("podSelector", {})
        check(set(selector) <= {"matchLabels", "matchExpressions"}, f"{what}: podSelector: matchLabels and matchExpressions only")
        picked = [n for n in pod_labels if selects_pods(selector, pod_labels[n])]
        if check(len(picked) == 1, f"{what}: podSelector must pick exactly one Deployment's pods, picks {picked}"):
            role = picked[0].rsplit("-", 1)[1]
            check(role not in by_role, f"{what}: a second policy for the {role} pods")
            by_role[role] = policy
            check(policy["metadata"].get("labels", {}).get("app.kubernetes.io/component") == role,
                  f"{what}: app.kubernetes.io/component must be {role}")
            if load_labels is not None:
                check(selects_pods(selector, load_labels) == (role == "client"),
                      f"{what}: the load-test Job's pods are client pods: the client policy, and only it, must select them")
        for direction in ("ingress", "egress"):
            for rule in spec.get(direction, []):
                for port in rule.get("ports", []):
                    check(port.get("protocol", "TCP") in ("TCP", "UDP"), f"{what}: {direction} port {port}: TCP or UDP")
    if not check(set(by_role) == {"server", "client"}, f"network-policies/: one policy for the server pods and one for the client pods ({label})"):
        return
    ws_port, metrics_port = resolve_port(server, "websocket"), resolve_port(server, "metrics")

    what = f"{where(by_role['server'])} ({label})"
    spec = by_role["server"]["spec"]
    check(spec.get("policyTypes") == ["Ingress"], f"{what}: policyTypes must be [Ingress] (the server's egress stays open)")
    allowed = {}
    for rule in spec.get("ingress", []):
        for port in rule.get("ports", []) or [{"port": None}]:
            number = resolve_port(server, port["port"]) if port["port"] is not None else "every port"
            check(number is not None, f"{what}: port {port['port']} is none of the server container's ports")
            check(port.get("protocol", "TCP") == "TCP", f"{what}: the server listens on TCP only")
            allowed.setdefault(number, []).append(rule.get("from"))
    check(set(allowed) == {ws_port, metrics_port},
          f"{what}: ingress must name exactly the websocket ({ws_port}) and metrics ({metrics_port}) ports, names {sorted(map(str, allowed))}")
    check(allowed.get(ws_port) == [None], f"{what}: the websocket port must be open to every client (one rule, no from)")
    check(allowed.get(metrics_port) == [[{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: MONITORING_NAMESPACE}}}]],
          f"{what}: the metrics port must be open to the namespace {MONITORING_NAMESPACE} only "
          f"(one rule: from namespaceSelector {NAMESPACE_NAME_LABEL}: {MONITORING_NAMESPACE})")

    what = f"{where(by_role['client'])} ({label})"
    spec = by_role["client"]["spec"]
    check(sorted(spec.get("policyTypes", [])) == ["Egress", "Ingress"], f"{what}: policyTypes must be Ingress and Egress")
    client_metrics = resolve_port(client, "metrics")
    allowed = {}
    for rule in spec.get("ingress", []):
        for port in rule.get("ports", []) or [{"port": None}]:
            number = resolve_port(client, port["port"]) if port["port"] is not None else "every port"
            check(number is not None, f"{what}: port {port['port']} is none of the client container's ports")
            allowed.setdefault(number, []).append(rule.get("from"))
    check(client_metrics is not None and allowed == {client_metrics: [[{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: MONITORING_NAMESPACE}}}]]},
          f"{what}: ingress must be one rule: the client's metrics port ({client_metrics}) from the namespace "
          f"{MONITORING_NAMESPACE} only (namespaceSelector {NAMESPACE_NAME_LABEL}: {MONITORING_NAMESPACE}); nothing else connects to a client")
    if load_job is not None:
        load_container = load_job["spec"]["template"]["spec"]["containers"][0]
        check(resolve_port(load_container, "metrics") == client_metrics,
              f"{what}: the load-test pods' metrics port must be the client Deployment's ({client_metrics}), which the rule opens by name")
    egress = spec.get("egress", [])
    to_server = [r for r in egress if r.get("to") and all(set(peer) == {"podSelector"} for peer in r["to"])]
    to_dns = [r for r in egress if r.get("to") == [DNS_PEER]]
    check(len(egress) == 2 and len(to_server) == 1 and len(to_dns) == 1,
          f"{what}: egress must be two rules: to the server pods, and to kube-dns in kube-system")
    if to_server:
        peers = to_server[0]["to"]
        check(all(selects_pods(p["podSelector"], pod_labels["websocket-test-server"])
                  and not selects_pods(p["podSelector"], pod_labels["websocket-test-client"]) for p in peers),
              f"{what}: the egress rule's podSelector must pick the server pods only")
        # Policies see the pod's port after the Service's translation: the targetPort.
        target = next((p.get("targetPort", p["port"]) for p in service["spec"]["ports"] if p.get("name") == "websocket"), None)
        ports = [resolve_port(server, p["port"]) for p in to_server[0].get("ports", [])]
        check(ports == [ws_port] and resolve_port(server, target) == ws_port,
              f"{what}: egress to the server must allow its websocket port {ws_port} (the Service's targetPort) and no other")
    if to_dns:
        ports = sorted((p["port"], p.get("protocol", "TCP")) for p in to_dns[0].get("ports", []))
        check(ports == [(53, "TCP"), (53, "UDP")], f"{what}: DNS egress must be port 53 over UDP and TCP, is {ports}")


def dashboard_configmap_text():
    dashboard = DASHBOARD_JSON.read_text()
    body = "".join(f"    {line}\n" if line else "\n" for line in dashboard.rstrip("\n").split("\n"))
    return (
        "# GENERATED by `scripts/check-manifests --update` from dashboards/websocket-test.json: edit that.\n"
        "# The Grafana dashboard as a ConfigMap for Grafana's dashboard sidecar (kube-prometheus-stack\n"
        "# loads ConfigMaps labelled grafana_dashboard=\"1\" from its namespace, or from all namespaces\n"
        "# with sidecar.dashboards.searchNamespace=ALL). Or import the JSON in Grafana by hand.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: websocket-test-dashboard\n"
        "  labels:\n"
        "    app.kubernetes.io/name: websocket-test\n"
        "    app.kubernetes.io/part-of: websocket-test\n"
        '    grafana_dashboard: "1"\n'
        "data:\n"
        "  websocket-test.json: |\n" + body)


def metric_names(expr):
    return set(re.findall(r"\b((?:websocket|process)_[a-z_]+)\b", expr))


def metric_job(name):
    """The job whose pods export metric `name`: the client's are websocket_client_*."""
    return CLIENT_JOB if name.startswith("websocket_client_") else JOB


def check_job_selected(what, expr):
    """Every selector of a query names the job of its metric: job="websocket-test-server" for
    the server's metrics (and process_*), job="websocket-test-client" for websocket_client_*."""
    selectors = re.findall(r"\b((?:websocket|process|up)[a-z_]*)\{([^}]*)\}", expr)
    check(selectors, f"{what}: no selector in {expr}")
    for name, labels in selectors:
        if name == "up":
            check(re.search(r'job="(websocket-test-server|websocket-test-client)"', labels),
                  f'{what}: up{{...}} must select job="{JOB}" or "{CLIENT_JOB}": {expr}')
        else:
            check(f'job="{metric_job(name)}"' in labels, f'{what}: {name} must select job="{metric_job(name)}": {expr}')


def check_pod(workload, role, want_version, env_known):
    """The pod template of a Deployment or Job: security, the image, resources, variable names."""
    pod = workload["spec"]["template"]["spec"]
    check(pod.get("enableServiceLinks") is False, f"{where(workload)}: enableServiceLinks must be false (WEBSOCKET_TEST_* collisions)")
    check(pod.get("automountServiceAccountToken") is False, f"{where(workload)}: automountServiceAccountToken should be false")
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
          f"{where(workload)}: pod securityContext needs runAsNonRoot and seccomp RuntimeDefault")
    check(psc.get("runAsUser") == 65532 and psc.get("runAsGroup") == 65532,
          f"{where(workload)}: run as 65532:65532, the image's user")
    check(len(pod["containers"]) == 1, f"{where(workload)}: one container expected")
    check(not pod.get("initContainers"), f"{where(workload)}: no init containers "
                                         f"(the one allowed is {NODE_TUNING_PATCH.relative_to(ROOT)}'s, checked on its own)")
    for container in pod["containers"]:
        what = f"{where(workload)} container {container['name']}"
        check(container.get("image") == f"{IMAGES[role]}:{want_version}",
              f"{what}: image {container.get('image')} != {IMAGES[role]}:{want_version}")
        check("command" not in container, f"{what}: no command: the image's ENTRYPOINT is the binary")
        sc = container.get("securityContext", {})
        check(sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation must be false")
        check(sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem must be true")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add"),
              f"{what}: capabilities must drop ALL and add none")
        check(sc.get("privileged") in (None, False), f"{what}: must not be privileged")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            check({"cpu", "memory"} <= set(resources.get(kind, {})), f"{what}: needs cpu and memory {kind}")
        if {"cpu", "memory"} <= set(resources.get("requests", {})) and {"cpu", "memory"} <= set(resources.get("limits", {})):
            check(quantity_bytes(resources["requests"]["memory"]) <= quantity_bytes(resources["limits"]["memory"])
                  and quantity_cpu(resources["requests"]["cpu"]) <= quantity_cpu(resources["limits"]["cpu"]),
                  f"{what}: requests exceed limits")
        for env in container.get("env", []):
            if role in env_known and env["name"].startswith("WEBSOCKET_TEST_"):
                check(env["name"] in env_known[role], f"{what}: {role} does not read {env['name']} (not in its --help)")


def check_client_metrics(workload, container):
    """A client pod serves its metrics: WEBSOCKET_TEST_METRICS_PORT set (the client's metrics
    port is off by default), the container port named metrics, /readyz as readiness probe, and
    the prometheus.io annotations. Returns the port."""
    what = f"{where(workload)} container {container['name']}"
    port = next((env.get("value") for env in container.get("env", []) if env["name"] == "WEBSOCKET_TEST_METRICS_PORT"), None)
    if not check(port is not None and str(port).isdigit(), f"{what}: set WEBSOCKET_TEST_METRICS_PORT (the client serves no metrics without it)"):
        return None
    port = int(port)
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    check(ports == {"metrics": port}, f"{what}: container ports {ports} != what the client listens on (metrics {port})")
    get = container.get("readinessProbe", {}).get("httpGet", {})
    check(get.get("path") == "/readyz" and container_port(container, get.get("port")) == port,
          f"{what}: readinessProbe must GET /readyz on the metrics port")
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    check(annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port") == str(port)
          and annotations.get("prometheus.io/path") == "/metrics",
          f"{where(workload)}: prometheus.io/scrape, port {port} and path /metrics annotations")
    return port


def check_load_job(job, client_metrics_port, service_ports, server_values, want_version, env_known):
    """manifests/load-test/: an Indexed Job of client pods, all running at once, pointed at the
    Service like the client Deployment, each sized for its connections."""
    spec = job["spec"]
    check(spec.get("completionMode") == "Indexed", f"{where(job)}: completionMode must be Indexed")
    check(spec.get("completions") == spec.get("parallelism") and spec.get("completions", 0) >= 1,
          f"{where(job)}: completions ({spec.get('completions')}) must equal parallelism ({spec.get('parallelism')}): every pod at once")
    check("backoffLimitPerIndex" in spec, f"{where(job)}: set backoffLimitPerIndex, so one failed pod does not end the others")
    labels = spec["template"]["metadata"].get("labels", {})
    check(labels.get("app.kubernetes.io/name") == "websocket-test" and labels.get("app.kubernetes.io/component") == LOAD_COMPONENT
          and job["metadata"].get("labels", {}).get("app.kubernetes.io/component") == LOAD_COMPONENT,
          f"{where(job)}: the Job and its pods need app.kubernetes.io/component={LOAD_COMPONENT}")
    pod = spec["template"]["spec"]
    check(pod.get("restartPolicy") == "Never", f"{where(job)}: restartPolicy must be Never (backoffLimitPerIndex needs it)")
    check_pod(job, "client", want_version, env_known)
    container = pod["containers"][0]
    what = f"{where(job)} container {container['name']}"
    values = settings(container)
    check(values.get("WEBSOCKET_TEST_HOST") == SERVICE and int(values["WEBSOCKET_TEST_PORT"]) == service_ports["websocket"]["port"]
          and values["WEBSOCKET_TEST_PATH"] == server_values["WEBSOCKET_TEST_PATH"],
          f"{what}: must connect to the Service {SERVICE}, its websocket port and the server's path")
    check(check_client_metrics(job, container) == client_metrics_port,
          f"{what}: the metrics port must be the client Deployment's (one PodMonitor and NetworkPolicy serve both)")
    connections = values.get("WEBSOCKET_TEST_CONNECTIONS")
    if check(connections is not None and connections.isdigit() and values.get("WEBSOCKET_TEST_RAMP"),
             f"{what}: set WEBSOCKET_TEST_CONNECTIONS and WEBSOCKET_TEST_RAMP (the parameters)"):
        per_connection = MEMORY_PER_CONNECTION_KIB + (MEMORY_LOAD_MODE_KIB if "WEBSOCKET_TEST_MESSAGE_SIZE" in values else 0)
        need = int(connections) * per_connection * 1024 + (MEMORY_HEADROOM_MIB << 20)
        limit = quantity_bytes(container["resources"]["limits"]["memory"])
        check(limit >= need, f"{what}: memory limit {limit >> 20} MiB < {connections} connections x "
                             f"{per_connection} KiB + {MEMORY_HEADROOM_MIB} MiB = {need >> 20} MiB"
                             f"{' (load mode)' if per_connection > MEMORY_PER_CONNECTION_KIB else ''}")
    duration = values.get("WEBSOCKET_TEST_DURATION")
    if check(duration is not None, f"{what}: set WEBSOCKET_TEST_DURATION, so the pods finish and the Job completes"):
        check(spec.get("activeDeadlineSeconds", 0) > parse_duration_s(duration),
              f"{where(job)}: activeDeadlineSeconds {spec.get('activeDeadlineSeconds')} must exceed WEBSOCKET_TEST_DURATION {duration}")


def merged(doc, patch):
    """`doc` with `patch` merged in: maps key by key, anything else replaced. What a strategic
    merge patch does where, as here, the patched lists (initContainers) are absent from `doc`."""
    if not (isinstance(doc, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    out = copy.deepcopy(doc)
    for key, value in patch.items():
        out[key] = merged(doc[key], value) if key in doc else copy.deepcopy(value)
    return out


def write_node_tuning(out):
    """The server Deployments of manifests/ and wss/ as `kubectl patch` with node-tuning/'s
    patch leaves them, into `out` for kubernetes-validate."""
    patch = yaml.safe_load(NODE_TUNING_PATCH.read_text())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, path in (("manifests-server+node-tuning.yaml", MANIFESTS / "server.yaml"),
                       ("wss-server+node-tuning.yaml", WSS / "server.yaml")):
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == "Deployment"]
        (out / name).write_text(yaml.safe_dump_all([merged(doc, patch) for doc in docs], sort_keys=False))


def check_node_tuning(patch, servers):
    """manifests/node-tuning/: a patch of the server Deployments (manifests/ and wss/) that adds
    one init container and nothing else; that container is the manifests' one exception to
    no privileged and no root, so it must be exactly the sysctl (see NODE_TUNING_*)."""
    what = str(NODE_TUNING_PATCH.relative_to(ROOT))
    inits = (patch or {}).get("spec", {}).get("template", {}).get("spec", {}).get("initContainers")
    if not check(isinstance(inits, list) and patch == {"spec": {"template": {"spec": {"initContainers": inits}}}},
                 f"{what}: must set spec.template.spec.initContainers and nothing else"):
        return
    if not check(len(inits) == 1, f"{what}: one init container expected, found {len(inits)}"):
        return
    init = inits[0]
    what = f"{what}: init container {init.get('name')}"
    check(NODE_TUNING_IMAGE.match(init.get("image", "")),
          f"{what}: image {init.get('image')} must be busybox pinned by version (docker.io/library/busybox:X.Y.Z)")
    check(init.get("command") == NODE_TUNING_COMMAND and "args" not in init,
          f"{what}: may run {NODE_TUNING_COMMAND} and nothing else (it is privileged)")
    check(init.get("securityContext") == NODE_TUNING_SECURITY,
          f"{what}: securityContext must be exactly {NODE_TUNING_SECURITY} (privileged and root for /proc/sys, nothing more)")
    check(not {"env", "envFrom", "volumeMounts", "ports"} & set(init), f"{what}: no env, volumes or ports")
    resources = init.get("resources", {})
    if check(all({"cpu", "memory"} <= set(resources.get(kind, {})) for kind in ("requests", "limits")),
             f"{what}: needs cpu and memory requests and limits"):
        check(quantity_bytes(resources["requests"]["memory"]) <= quantity_bytes(resources["limits"]["memory"])
              and quantity_cpu(resources["requests"]["cpu"]) <= quantity_cpu(resources["limits"]["cpu"]),
              f"{what}: requests exceed limits")
    for server in servers:
        pod = server["spec"]["template"]["spec"]
        check(not pod.get("initContainers"), f"{where(server)}: has init containers, which the patch would merge with")
        check(init.get("name") not in {c["name"] for c in pod["containers"]}, f"{where(server)}: a container is named {init.get('name')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true")
    parser.add_argument("--node-tuning-out")
    parser.add_argument("--server-help")
    parser.add_argument("--client-help")
    parser.add_argument("--metrics-sample")
    parser.add_argument("--client-metrics-sample")
    args = parser.parse_args()
    if args.node_tuning_out:
        write_node_tuning(args.node_tuning_out)
        return 0
    if args.update:
        DASHBOARD_CONFIGMAP.write_text(dashboard_configmap_text())
        print(f"wrote {DASHBOARD_CONFIGMAP.relative_to(ROOT)}")
        return 0
    want_version = version()

    # --- What `kubectl apply -f manifests/` and `-f manifests/monitoring/` pick up ----------
    # (apply -f DIR reads the .yaml/.yml/.json files directly in DIR, not subfolders.)
    top_files = sorted(p for p in MANIFESTS.iterdir() if p.is_file())
    mon_files = sorted(p for p in MONITORING.iterdir() if p.is_file())
    for path in top_files + mon_files:
        check(path.suffix == ".yaml", f"{path.relative_to(ROOT)}: kubectl apply -f on the folder would read it; only .yaml manifests belong there")
    top = [doc for path in top_files if path.suffix == ".yaml" for doc in load(path)]
    mon = [doc for path in mon_files if path.suffix == ".yaml" for doc in load(path)]
    # Applied on their own: manifests/wss/ instead of manifests/, cert-manager/,
    # network-policies/ and load-test/ in addition.
    wss_files = sorted(p for p in WSS.iterdir() if p.is_file())
    cm_files = sorted(p for p in CERT_MANAGER.iterdir() if p.is_file())
    np_files = sorted(p for p in NETWORK_POLICIES.iterdir() if p.is_file())
    load_files = sorted(p for p in LOAD_TEST.iterdir() if p.is_file())
    for path in wss_files + cm_files + np_files + load_files:
        check(path.suffix == ".yaml", f"{path.relative_to(ROOT)}: kubectl apply -f on the folder would read it; only .yaml manifests belong there")
    wss_docs = [doc for path in wss_files if path.suffix == ".yaml" for doc in load(path)]
    cm_docs = [doc for path in cm_files if path.suffix == ".yaml" for doc in load(path)]
    np_docs = [doc for path in np_files if path.suffix == ".yaml" for doc in load(path)]
    load_docs = [doc for path in load_files if path.suffix == ".yaml" for doc in load(path)]
    for doc in wss_docs + cm_docs + np_docs + load_docs:
        if not check({"apiVersion", "kind", "metadata"} <= set(doc), f"{doc['__file']}: a document without apiVersion, kind or metadata"):
            return report()
    load_jobs = [doc for doc in load_docs if doc["apiVersion"] == "batch/v1" and doc["kind"] == "Job"]
    check(len(load_jobs) == len(load_docs) == 1 and load_jobs[0]["metadata"]["name"] == LOAD_JOB,
          f"{LOAD_TEST.relative_to(ROOT)}: one batch/v1 Job, {LOAD_JOB}, and nothing else")
    load_job = load_jobs[0] if len(load_jobs) == 1 else None
    for doc in wss_docs:
        check(doc["apiVersion"] in CORE_API_VERSIONS, f"{where(doc)}: core kinds only in wss/ (cert-manager's go in wss/cert-manager/)")
    for doc in cm_docs:
        check(doc["apiVersion"] == "cert-manager.io/v1", f"{where(doc)}: only cert-manager kinds in wss/cert-manager/")
    for doc in np_docs:
        check(doc["apiVersion"] == "networking.k8s.io/v1" and doc["kind"] == "NetworkPolicy",
              f"{where(doc)}: only NetworkPolicies in network-policies/")
    for doc in top + mon:
        if not check({"apiVersion", "kind", "metadata"} <= set(doc), f"{doc['__file']}: a document without apiVersion, kind or metadata"):
            return report()
    for doc in top:
        check(doc["apiVersion"] in CORE_API_VERSIONS,
              f"{where(doc)}: {doc['apiVersion']} in manifests/ would fail on clusters without its CRD; put it in monitoring/")

    for path in top_files + mon_files:
        groups = {doc["apiVersion"].startswith("monitoring.coreos.com/") for doc in top + mon if doc["__file"] == str(path.relative_to(ROOT))}
        check(len(groups) <= 1, f"{path.relative_to(ROOT)}: keep Prometheus-operator kinds and core kinds in separate files "
                                "(scripts/check-manifests validates them differently)")
    by_kind = {}
    for doc in top + mon:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for doc in top + mon + wss_docs + cm_docs + np_docs + load_docs:
        labels = doc["metadata"].get("labels", {})
        check(labels.get("app.kubernetes.io/name") == "websocket-test" and labels.get("app.kubernetes.io/part-of") == "websocket-test",
              f"{where(doc)}: needs labels app.kubernetes.io/name and part-of = websocket-test")
        if "app.kubernetes.io/version" in labels:
            check(labels["app.kubernetes.io/version"] == want_version,
                  f"{where(doc)}: app.kubernetes.io/version {labels['app.kubernetes.io/version']} != Cargo.toml {want_version}")
        check("namespace" not in doc["metadata"], f"{where(doc)}: no namespace, so the manifests apply to any")
    for kind, schema in CRD_SCHEMAS.items():
        for doc in by_kind.get(kind, []):
            body = {k: v for k, v in doc.items() if k != "__file"}
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(body), key=str)
            check(not errors, f"{where(doc)}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors))

    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    if not (check(set(deployments) == {"websocket-test-server", "websocket-test-client"},
                  f"expected Deployments websocket-test-server and websocket-test-client, got {sorted(deployments)}")
            and check(SERVICE in services, f"no Service {SERVICE}")):
        return report()
    server, client, service = deployments["websocket-test-server"], deployments["websocket-test-client"], services[SERVICE]
    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}

    # --- Deployments: selectors, pods, containers -------------------------------------------
    env_known = {}
    for role, path in (("server", args.server_help), ("client", args.client_help)):
        if path:
            env_known[role] = set(re.findall(r"\[env: (WEBSOCKET_TEST_[A-Z_]+)=", Path(path).read_text()))
            check(len(env_known[role]) > 5, f"{path}: no [env: ...] entries found in the --help output")
    for name, deployment in deployments.items():
        role = name.rsplit("-", 1)[1]
        spec = deployment["spec"]
        selector = spec["selector"]
        check(set(selector) == {"matchLabels"}, f"{where(deployment)}: use matchLabels only")
        check(selects(selector.get("matchLabels"), pod_labels[name]), f"{where(deployment)}: selector does not match its pod labels")
        other = [o for o in deployments if o != name]
        check(not any(selects(selector.get("matchLabels"), pod_labels[o]) for o in other),
              f"{where(deployment)}: selector also matches the pods of {other}")
        if load_job is not None:
            check(not selects(selector.get("matchLabels"), load_job["spec"]["template"]["metadata"]["labels"]),
                  f"{where(deployment)}: selector also matches the pods of the load-test Job {LOAD_JOB}")
        check(deployment["metadata"].get("labels", {}).get("app.kubernetes.io/component") == role
              and pod_labels[name].get("app.kubernetes.io/component") == role,
              f"{where(deployment)}: app.kubernetes.io/component must be {role}")
        check_pod(deployment, role, want_version, env_known)

    # --- The server: ports, probes, shutdown timing, memory, scraping -----------------------
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    values = settings(container)
    ws_port, metrics_port = int(values["WEBSOCKET_TEST_PORT"]), int(values["WEBSOCKET_TEST_METRICS_PORT"])
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    check(ports == {"websocket": ws_port, "metrics": metrics_port},
          f"{where(server)}: container ports {ports} != what the server listens on (websocket {ws_port}, metrics {metrics_port})")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and container_port(container, get.get("port")) == metrics_port,
              f"{where(server)}: {probe} must GET {path} on the metrics port")
    shutdown_s = parse_duration_s(values["WEBSOCKET_TEST_SHUTDOWN_TIMEOUT"])
    pre_stop_s = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(grace > pre_stop_s + shutdown_s + ABORT_GRACE_S,
          f"{where(server)}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop_s}s + shutdown timeout {shutdown_s}s + {ABORT_GRACE_S}s")
    max_connections = values.get("WEBSOCKET_TEST_MAX_CONNECTIONS")
    if check(max_connections is not None, f"{where(server)}: set WEBSOCKET_TEST_MAX_CONNECTIONS so the memory limit can be sized for it"):
        need = int(max_connections) * MEMORY_PER_CONNECTION_KIB * 1024 + (MEMORY_HEADROOM_MIB << 20)
        limit = quantity_bytes(container["resources"]["limits"]["memory"])
        check(limit >= need, f"{where(server)}: memory limit {limit >> 20} MiB < {max_connections} connections x "
                             f"{MEMORY_PER_CONNECTION_KIB} KiB + {MEMORY_HEADROOM_MIB} MiB = {need >> 20} MiB")
    annotations = server["spec"]["template"]["metadata"].get("annotations", {})
    check(annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port") == str(metrics_port)
          and annotations.get("prometheus.io/path") == "/metrics",
          f"{where(server)}: prometheus.io/scrape, port {metrics_port} and path /metrics annotations")
    # The server's name (X-Served-By, the clients' backend label) defaults to $POD_NAME.
    pod_name = next((env for env in container.get("env", []) if env["name"] == "POD_NAME"), {})
    check(pod_name.get("valueFrom") == {"fieldRef": {"fieldPath": "metadata.name"}},
          f"{where(server)}: set POD_NAME from the downward API (fieldRef metadata.name), so X-Served-By names the pod")

    # --- The Service: type, selector, named ports that agree with the server's ---------------
    spec = service["spec"]
    check(spec.get("type", "ClusterIP") == "ClusterIP", f"{where(service)}: must be ClusterIP")
    check(selects(spec.get("selector"), pod_labels["websocket-test-server"]), f"{where(service)}: selector does not match the server pods")
    check(not selects(spec.get("selector"), pod_labels["websocket-test-client"]), f"{where(service)}: selector matches the client pods")
    service_ports = {p.get("name"): p for p in spec.get("ports", [])}
    check(set(service_ports) == {"websocket", "metrics"}, f"{where(service)}: ports must be named websocket and metrics")
    for name, number in (("websocket", 3003), ("metrics", 9100)):
        port = service_ports.get(name)
        if check(port is not None, f"{where(service)}: no port {name}"):
            check(port["port"] == number, f"{where(service)}: port {name} must be {number}")
            check(container_port(container, port.get("targetPort", port["port"])) == ports.get(name),
                  f"{where(service)}: port {name} targets {port.get('targetPort')}, not the server's {name} port")

    # --- The client points at the Service by name and port ----------------------------------
    cvalues = settings(client["spec"]["template"]["spec"]["containers"][0])
    check(cvalues.get("WEBSOCKET_TEST_HOST") == SERVICE,
          f"{where(client)}: WEBSOCKET_TEST_HOST (or --host) must be the Service name {SERVICE}, is {cvalues.get('WEBSOCKET_TEST_HOST')}")
    check(int(cvalues["WEBSOCKET_TEST_PORT"]) == service_ports["websocket"]["port"],
          f"{where(client)}: port {cvalues['WEBSOCKET_TEST_PORT']} != the Service's websocket port")
    check(cvalues["WEBSOCKET_TEST_PATH"] == values["WEBSOCKET_TEST_PATH"], f"{where(client)}: path differs from the server's")
    client_container = client["spec"]["template"]["spec"]["containers"][0]
    client_metrics_port = check_client_metrics(client, client_container)
    if load_job is not None:
        check_load_job(load_job, client_metrics_port, service_ports, values, want_version, env_known)
    client_pod_labels = [pod_labels["websocket-test-client"]] + ([load_job["spec"]["template"]["metadata"]["labels"]] if load_job else [])

    for pdb in by_kind.get("PodDisruptionBudget", []):
        check(selects(pdb["spec"]["selector"].get("matchLabels"), pod_labels["websocket-test-server"]),
              f"{where(pdb)}: selector does not match the server pods")
        check(pdb["spec"].get("minAvailable", 0) < server["spec"].get("replicas", 1),
              f"{where(pdb)}: minAvailable must be below the server's replicas, or no node can drain")

    # --- Monitoring: PodMonitor, alerts, dashboard ------------------------------------------
    # Metric names each job exports, from a scrape of each binary (when given): a name is
    # checked against the sample of the job whose metrics it belongs to.
    samples = {}
    for job, path, must in ((JOB, args.metrics_sample, "websocket_connections"),
                            (CLIENT_JOB, args.client_metrics_sample, "websocket_client_disconnects_total")):
        if path:
            samples[job] = {re.split(r"[{ ]", line, 1)[0] for line in Path(path).read_text().splitlines()
                            if line and not line.startswith("#")}
            check(must in samples[job], f"{path}: no {must}")

    def unknown_metrics(expr):
        names = metric_names(expr)
        for name in sorted(set(names) & set(RENAMED_METRICS)):
            check(False, f"{name} was renamed {RENAMED_METRICS[name]}: {expr}")
        return sorted(n for n in names if metric_job(n) in samples and n not in samples[metric_job(n)])

    monitors = by_kind.get("PodMonitor", []) + by_kind.get("ServiceMonitor", [])
    check(len(monitors) == 2 and not by_kind.get("ServiceMonitor"), "monitoring/: two PodMonitors expected, the server's and the clients'")
    monitored = {}
    for monitor in by_kind.get("PodMonitor", []):
        selector = monitor["spec"]["selector"]
        server_pods = selects_pods(selector, pod_labels["websocket-test-server"])
        client_pods = [selects_pods(selector, labels) for labels in client_pod_labels]
        if server_pods:
            check(not any(client_pods), f"{where(monitor)}: selector must match the server pods only")
            role, job, port = "server", JOB, metrics_port
        else:
            check(all(client_pods), f"{where(monitor)}: selector must match the server pods, or all client pods "
                                    f"(the client Deployment's and the load-test Job's)")
            role, job, port = "client", CLIENT_JOB, client_metrics_port
        check(role not in monitored, f"{where(monitor)}: a second PodMonitor for the {role} pods")
        monitored[role] = monitor
        scraped = container if role == "server" else client_container
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            check(container_port(scraped, endpoint.get("port")) == port and endpoint.get("path", "/metrics") == "/metrics",
                  f"{where(monitor)}: must scrape the {role}'s metrics port, /metrics")
            jobs = [r.get("replacement") for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
            check(jobs == [job], f'{where(monitor)}: must set job="{job}", which the alerts and dashboard select')
    alerts = {}
    for rule_doc in by_kind.get("PrometheusRule", []):
        for group in rule_doc["spec"]["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    check(REQUIRED_ALERTS <= set(alerts), f"monitoring/: missing alerts {sorted(REQUIRED_ALERTS - set(alerts))}")
    for name, rule in alerts.items():
        expr = str(rule["expr"])
        check_job_selected(f"alert {name}", expr)
        check({"summary", "description"} <= set(rule.get("annotations", {})) and "severity" in rule.get("labels", {}),
              f"alert {name}: needs a severity label and summary/description annotations")
        unknown = unknown_metrics(expr)
        check(not unknown, f"alert {name}: unknown metrics {unknown}")
    too_many = alerts.get("WebSocketTestTooManyConnections")
    if too_many and max_connections:
        threshold = re.search(r">\s*(\d+)", str(too_many["expr"]))
        check(threshold and int(threshold.group(1)) < int(max_connections),
              f"alert WebSocketTestTooManyConnections: threshold must be below WEBSOCKET_TEST_MAX_CONNECTIONS {max_connections}")

    dashboard = json.loads(DASHBOARD_JSON.read_text())
    check(dashboard.get("uid") and dashboard.get("title"), f"{DASHBOARD_JSON.name}: needs uid and title")
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*map(metric_names, exprs))
    check({"websocket_connections", "process_resident_memory_bytes", "process_cpu_seconds_total"} <= used,
          f"{DASHBOARD_JSON.name}: must chart the connection gauge and the process metrics")
    check({"websocket_client_connections", "websocket_client_backend_connections", "websocket_client_disconnects_total",
           "websocket_client_connection_duration_seconds_bucket", "websocket_connections_closed_total"} <= used,
          f"{DASHBOARD_JSON.name}: must chart the clients' connections, backends, disconnects and lifetimes, and the servers' ends")
    for expr in exprs:
        check_job_selected(DASHBOARD_JSON.name, expr)
    unknown = sorted(set().union(*map(unknown_metrics, exprs)))
    check(not unknown, f"{DASHBOARD_JSON.name}: unknown metrics {unknown}")
    ids = [p["id"] for p in dashboard["panels"]]
    check(len(ids) == len(set(ids)), f"{DASHBOARD_JSON.name}: panel ids must be unique")
    check(DASHBOARD_CONFIGMAP.exists() and DASHBOARD_CONFIGMAP.read_text() == dashboard_configmap_text(),
          f"{DASHBOARD_CONFIGMAP.relative_to(ROOT)} is out of date: run scripts/check-manifests --update")

    # --- wss variant, cert-manager example, NetworkPolicies ------------------------------------
    check_wss(top, wss_docs, cm_docs, env_known)
    node_files = sorted(p for p in NODE_TUNING_PATCH.parent.iterdir() if p.is_file())
    check(node_files == [NODE_TUNING_PATCH], f"{NODE_TUNING_PATCH.parent.relative_to(ROOT)}/: only {NODE_TUNING_PATCH.name} expected, "
                                             f"found {[p.name for p in node_files]}")
    wss_server = next((d for d in wss_docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "websocket-test-server"), None)
    check_node_tuning(yaml.safe_load(NODE_TUNING_PATCH.read_text()), [server] + ([wss_server] if wss_server else []))
    check_network_policies(np_docs, deployments, service, "manifests/", load_job)
    wss_deployments = {d["metadata"]["name"]: d for d in wss_docs if d["kind"] == "Deployment"}
    wss_service = next((d for d in wss_docs if d["kind"] == "Service" and d["metadata"]["name"] == SERVICE), None)
    if set(wss_deployments) == set(deployments) and wss_service:
        check_network_policies(np_docs, wss_deployments, wss_service, "wss/", load_job)
    return report()


def report():
    for failure in failures:
        print(f"  FAILED  {failure}")
    print(f"  manifest checks: {passes} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
