#!/usr/bin/env python3
"""The Python half of deploy/check.sh: checks on rendered manifests, alerts and dashboard.

Each subcommand prints what it checked and exits non-zero on any failure:

  validate FILE          schema-validate every object in a rendered overlay: built-in kinds
                         strictly with kubernetes-validate, custom resources against
                         deploy/schemas/crds.yaml; an unknown kind fails
  invariants FILE        herald's own rules for its Deployments (probes, drain timing,
                         security context, secrets only as read-only files)
  metrics METRICS_FILE   every metric the dashboard and the alerts query exists in a real
                         /metrics output of herald, and every label they match on is one
                         herald puts on that metric
  runbooks               every alert links a section of docs/operations.md that exists

Run by deploy/check.sh inside its venv (PyYAML, jsonschema, kubernetes-validate,
promql-parser); not meant to be called by hand, though it can be.
"""

import json
import re
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
RULES = DEPLOY / "k8s/components/monitoring/prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana/herald-dashboard.json"
OPERATIONS = REPO / "docs/operations.md"

# Kubernetes versions the manifests must be valid for: the oldest still commonly run that
# has every field we use (matchLabelKeys in topology spread is 1.27+, beta and on by
# default), and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30.0", "1.37.0"]

# Metrics the alerts use that herald does not export, with who does. Anything else not in
# the metrics file is a failure.
EXTERNAL_METRICS = {
    "kube_pod_status_ready": "kube-state-metrics (HeraldPodsNotReady)",
}

# Labels Prometheus (via the ServiceMonitor) adds to every herald series; not in /metrics.
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "container", "endpoint"}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def fail(problems, what):
    """Print problems (or OK) for one check; return True when it passed."""
    if problems:
        print(f"FAIL {what}")
        for p in problems:
            print(f"     - {p}")
        return False
    print(f"ok   {what}")
    return True


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def resource_id(doc):
    md = doc.get("metadata", {})
    return f"{doc.get('kind')}/{md.get('namespace', '-')}/{md.get('name')}"


# ---------------------------------------------------------------------------------------
# validate


def crd_schemas():
    import jsonschema

    raw = yaml.safe_load((DEPLOY / "schemas/crds.yaml").read_text())
    defs = raw.pop("$defs")
    out = {}
    for key, schema in raw.items():
        schema = dict(schema, **{"$defs": defs})
        jsonschema.Draft202012Validator.check_schema(schema)
        out[key] = jsonschema.Draft202012Validator(schema)
    return out


def cmd_validate(path):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    crds = crd_schemas()
    problems = []
    counts = {"built-in": 0, "custom": 0}
    for doc in load_docs(path):
        rid = resource_id(doc)
        key = f"{doc.get('apiVersion')} {doc.get('kind')}"
        if key in crds:
            counts["custom"] += 1
            for err in crds[key].iter_errors(doc):
                where = "/".join(str(p) for p in err.absolute_path) or "(root)"
                problems.append(f"{rid}: {where}: {err.message} (schema deploy/schemas/crds.yaml)")
            continue
        counts["built-in"] += 1
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except SchemaNotFoundError:
                problems.append(
                    f"{rid}: no schema for {key} in Kubernetes {version}; if it is a custom "
                    "resource, add its schema to deploy/schemas/crds.yaml"
                )
            except ValidationError as e:
                where = "/".join(str(p) for p in e.path) or "(root)"
                problems.append(f"{rid}: Kubernetes {version}: {where}: {e.message}")
    return fail(
        problems,
        f"schema: {counts['built-in']} built-in objects (strict, Kubernetes "
        f"{' and '.join(K8S_VERSIONS)}), {counts['custom']} custom resources "
        f"(deploy/schemas/crds.yaml) in {Path(path).name}",
    )


# ---------------------------------------------------------------------------------------
# invariants


def parse_duration_s(text):
    """'25s', '1m30s', '500ms' -> seconds (float)."""
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def shutdown_grace_s():
    """http.shutdown_grace from config/default.toml (herald's drain bound)."""
    import tomllib

    cfg = tomllib.loads((REPO / "config/default.toml").read_text())
    return parse_duration_s(cfg["http"]["shutdown_grace"])


def cmd_invariants(path):
    grace = shutdown_grace_s()
    problems = []
    deployments = [d for d in load_docs(path) if d.get("kind") == "Deployment"]
    if not deployments:
        problems.append("no Deployment rendered")
    for d in deployments:
        rid = resource_id(d)
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{rid}: pod securityContext.runAsNonRoot is not true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{rid}: pod seccompProfile is not RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{rid}: automountServiceAccountToken is not false")
        if not pod.get("topologySpreadConstraints") and not pod.get("affinity"):
            problems.append(f"{rid}: no topology spread or anti-affinity")
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for c in pod["containers"]:
            cid = f"{rid} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cid}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cid}: readOnlyRootFilesystem is not true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{cid}: capabilities do not drop ALL")
            for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                got = c.get(probe, {}).get("httpGet", {}).get("path")
                if got != want:
                    problems.append(f"{cid}: {probe} path is {got!r}, want {want!r}")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{cid}: no {kind}.{r}")
            # The drain must fit: preStop sleep, then herald's shutdown_grace, inside the
            # grace period, or Kubernetes SIGKILLs a pod that is still delivering.
            pre = c.get("lifecycle", {}).get("preStop", {})
            cmd = pre.get("exec", {}).get("command", [])
            pre_s = float(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else float(
                pre.get("sleep", {}).get("seconds", 0)
            )
            if not pre:
                problems.append(f"{cid}: no preStop hook")
            if tgps < pre_s + grace + 1:
                problems.append(
                    f"{cid}: terminationGracePeriodSeconds {tgps} < preStop {pre_s:g}s + "
                    f"shutdown_grace {grace:g}s + 1s"
                )
            # Secrets only as read-only files: never env (it leaks into `kubectl describe`,
            # crash dumps and child processes).
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    problems.append(f"{cid}: env {e['name']} comes from a Secret; mount it as a file")
            if c.get("envFrom"):
                problems.append(f"{cid}: envFrom is not allowed (secrets must be files)")
            for m in c.get("volumeMounts", []):
                if m["name"] in secret_volumes and m.get("readOnly") is not True:
                    problems.append(f"{cid}: secret volume {m['name']} is not mounted readOnly")
    return fail(
        problems,
        f"herald invariants on {len(deployments)} Deployment(s) in {Path(path).name} "
        f"(drain fits: shutdown_grace {grace:g}s)",
    )


# ---------------------------------------------------------------------------------------
# metrics


def parse_metrics_file(path):
    """-> {metric name: set of label names} from Prometheus text format (TYPE lines and
    samples; a family with no samples yet still counts as existing)."""
    found = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s")
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            parts = line.split()
            if len(parts) >= 3:
                found.setdefault(parts[2], set())
            continue
        if not line or line.startswith("#"):
            continue
        m = sample.match(line + " ")
        if m:
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"', m.group(3) or ""))
            found.setdefault(m.group(1), set()).update(labels)
    return found


def grafana_to_promql(expr):
    """Replace Grafana's $variables so the expression parses as PromQL."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}", "5m", expr)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "x", expr)


def dashboard_queries():
    """-> [(where, promql)] for every panel target and templating query."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk_panels(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"dashboard panel {p.get('title')!r}", t["expr"]))
            walk_panels(p.get("panels", []))

    walk_panels(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            # Grafana's label_values(metric, label) is not PromQL: check its metric.
            m = re.match(r"\s*label_values\(\s*(.+?)\s*,\s*[A-Za-z_]\w*\s*\)\s*$", q)
            out.append((f"dashboard variable {v['name']!r}", m.group(1) if m else q))
    return out


def alert_queries():
    out = []
    for doc in load_docs(RULES):
        for g in doc["spec"]["groups"]:
            for r in g["rules"]:
                out.append((f"alert {r.get('alert') or r.get('record')}", r["expr"]))
    return out


def selectors(expr):
    import promql_parser

    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def cmd_metrics(metrics_file):
    exported = parse_metrics_file(metrics_file)
    herald = sorted(n for n in exported if n.startswith("herald_"))
    problems = []
    if not herald:
        problems.append(f"{metrics_file} holds no herald_* metric: is it a herald /metrics output?")
    queries = dashboard_queries() + alert_queries()
    used = set()
    for where, expr in queries:
        try:
            sels = selectors(grafana_to_promql(expr))
        except Exception as e:  # promql_parser raises plain exceptions on syntax errors
            problems.append(f"{where}: PromQL does not parse: {e}: {expr}")
            continue
        for s in sels:
            name = s.name
            if not name:
                problems.append(f"{where}: selector without a metric name cannot be checked: {expr}")
                continue
            used.add(name)
            if name in EXTERNAL_METRICS:
                continue
            base = name
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name not in exported:
                    base = name[: -len(suffix)]
            if name not in exported and base not in exported:
                problems.append(f"{where}: metric {name} is not in {metrics_file}")
                continue
            labels = exported.get(name, set()) | exported.get(base, set())
            if name.endswith("_bucket"):
                labels |= {"le"}
            have_samples = bool(exported.get(name) or exported.get(base)) or any(
                k.startswith(base + "_") and exported[k] for k in exported
            )
            for k in (base + "_bucket", base + "_sum", base + "_count"):
                labels |= exported.get(k, set())
            if not have_samples:
                continue  # registered but no labelled sample yet: labels unknown
            for m in s.matchers.matchers:
                if m.name not in labels and m.name not in TARGET_LABELS:
                    problems.append(
                        f"{where}: {name} is matched on label {m.name!r}, which herald does not "
                        f"export on it (has: {', '.join(sorted(labels)) or 'none'})"
                    )
    herald_used = sorted(u for u in used if u not in EXTERNAL_METRICS)
    return fail(
        problems,
        f"metrics: {len(queries)} queries (dashboard and alerts) use {len(herald_used)} herald "
        f"series, checked against {Path(metrics_file).name} ({len(herald)} herald_* names); "
        f"external: {', '.join(sorted(u for u in used if u in EXTERNAL_METRICS)) or 'none'}",
    )


# ---------------------------------------------------------------------------------------
# runbooks


def github_anchor(heading):
    """GitHub's heading slug: lower case, drop punctuation except - and _, spaces to -."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def cmd_runbooks():
    anchors = set()
    if OPERATIONS.exists():
        for line in OPERATIONS.read_text().splitlines():
            m = re.match(r"^#{1,6}\s+(.*)$", line)
            if m:
                anchors.add(github_anchor(m.group(1)))
    problems = [] if OPERATIONS.exists() else [f"{OPERATIONS} is missing"]
    alerts = 0
    for doc in load_docs(RULES):
        for g in doc["spec"]["groups"]:
            for r in g["rules"]:
                if "alert" not in r:
                    continue
                alerts += 1
                name = r["alert"]
                sev = r.get("labels", {}).get("severity")
                if sev not in ("critical", "warning"):
                    problems.append(f"{name}: severity label is {sev!r}, want critical or warning")
                ann = r.get("annotations", {})
                for key in ("summary", "description", "runbook_url"):
                    if not ann.get(key):
                        problems.append(f"{name}: no {key} annotation")
                url = ann.get("runbook_url", "")
                m = re.search(r"docs/operations\.md#([\w-]+)$", url)
                if not m:
                    problems.append(f"{name}: runbook_url {url!r} does not point into docs/operations.md#...")
                elif m.group(1) not in anchors:
                    problems.append(f"{name}: docs/operations.md has no section #{m.group(1)}")
    return fail(problems, f"runbooks: {alerts} alerts each link an existing section of docs/operations.md")


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    ok = {
        "validate": lambda: cmd_validate(*args),
        "invariants": lambda: cmd_invariants(*args),
        "metrics": lambda: cmd_metrics(*args),
        "runbooks": lambda: cmd_runbooks(*args),
    }[cmd]()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
