#!/usr/bin/env python3
"""The Python half of deploy/check.sh: checks on rendered manifests, alerts and dashboard.

Each subcommand prints what it checked and exits non-zero on any failure:

  validate FILE          schema-validate every object in a rendered overlay: built-in kinds
                         strictly with kubernetes-validate, custom resources against
                         deploy/schemas/crds.yaml; an unknown kind fails
  invariants FILE        herald's own rules for its Deployments (probes, drain timing,
                         security context, secrets only as read-only files)
  security FILE          the lock-down of a rendered overlay: every pod behind a
                         NetworkPolicy, 8080 and the broker's AMQP ports only from named
                         sources, amqps:// with a mounted CA, one broker user per herald
                         role (never the default/admin user), and anchored permission
                         regexes that reach exactly the exchanges and queues each role uses,
                         topic permissions on the events exchange that let each publishing
                         role send exactly its own event kinds' routing keys;
                         the inbox's PostgreSQL: its URL a mounted Secret file of the
                         dispatcher and gateway only (never inline), sslmode verify-full
                         (or verify-ca/require) with a mounted CA, 5432 only from those
                         two roles, its own instances and the CloudNativePG operator, no
                         cleartext, no network superuser
  metrics METRICS_FILE   every metric the dashboard and the alerts query exists in a real
                         /metrics output of herald, and every label they match or group
                         (`by`) on is one herald puts on that metric
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

EVENTS_RS = REPO / "src/events.rs"


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
# security

HERALD_POD = {"app.kubernetes.io/name": "herald"}
AMQP_PORTS = (5671, 5672)
POSTGRES_PORT = 5432
# The herald roles that use the offline inbox: the dispatcher stores, the gateway replays.
# The api role never touches it, so it must not hold its credentials or reach 5432.
INBOX_ROLES = ("dispatcher", "gateway")
# The CloudNativePG operator's pods (its Helm chart and manifests label them so); the one
# peer outside herald's namespace that may reach PostgreSQL.
CNPG_OPERATOR_POD = {"app.kubernetes.io/name": "cloudnative-pg"}
# What the example inbox URL's sslmode may be: TLS always, never disable/allow/prefer,
# which fall back to cleartext. verify-full also checks the server's name against its
# certificate; verify-ca (managed services whose certificate does not name the host, e.g.
# Cloud SQL's per-instance CA) and require check the CA only, and require only with an
# sslrootcert (sqlx then verifies like verify-ca; without one it verifies nothing).
INBOX_SSLMODES = ("verify-full", "verify-ca", "require")


def selects(selector, labels):
    """Whether a Kubernetes label selector selects an object with `labels`."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def narrow(selector):
    """A selector that names something (an empty one selects everything)."""
    return bool(selector) and bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def admits_port(rule_ports, port, names=()):
    """Whether a NetworkPolicy rule's ports (none = all ports) include `port`."""
    if not rule_ports:
        return True
    for p in rule_ports:
        got = p.get("port")
        if got is None or got in names:
            return True
        if isinstance(got, int) and got <= port <= p.get("endPort", got):
            return True
    return False


def herald_toml(docs):
    """herald's effective [queue] prefix and the overlay's herald.toml (from its ConfigMap)."""
    import tomllib

    defaults = tomllib.loads((REPO / "config/default.toml").read_text())
    overlay = {}
    for d in docs:
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"].startswith("herald-config"):
            overlay = tomllib.loads(d.get("data", {}).get("herald.toml", ""))
    return defaults, overlay


def retry_queue_names(prefix, retry):
    """The retry queues Topology::new (src/queue/rabbitmq.rs) declares for [retry]."""
    base, top = parse_duration_s(retry["base_delay"]), parse_duration_s(retry["max_delay"])
    delays = []
    for k in range(retry["max_attempts"]):
        d = min(base * 2 ** min(k, 30), top)
        if not delays or delays[-1] != d:
            delays.append(d)
    return [f"{prefix}.retry.{round(d * 1000)}ms" for d in delays]


def role_resources(prefix, retry_queues):
    """(needed, refused) per role: {permission: [resource names]} that its regexes must and
    must not match. Mirrors what the code does with the broker (names with queue.prefix;
    "amq.default" is RabbitMQ's name for the default exchange in permission checks):

    - dispatcher (the only role that declares: RabbitQueue::connect -> Topology::declare,
      src/queue/rabbitmq.rs): exchange.declare work, dead, events; queue.declare dead,
      work (dead-letters to the dead exchange) and each retry queue (dead-letters to the
      work exchange); bind dead and work to their exchanges. RabbitMQ wants configure on
      each, write on a bound queue and on a dead-letter exchange, read on a binding's
      exchange and on a queue that dead-letters. Then it consumes work; publish_retry
      (default exchange), publish_dead (dead exchange), publish_event (events exchange);
      ClusterDirectory (src/directory/cluster/) declares the presence and replies
      exchanges, its own {prefix}.presence.<32 hex> queue (bound to presence, and to
      replies under its own name for snapshots) and its {prefix}.reply.<32 hex> queue
      (bound to replies under its own name), consumes both, and publishes deliveries and
      snapshot requests to node queues through the default exchange.
    - api: declares nothing (a passive declare of the work exchange needs no permission);
      publishes to the work exchange.
    - gateway: declares nothing but its own queue: the exclusive {prefix}.node.<node id>
      queue (never bound; no presence queue: only dispatchers follow presence); publishes presence
      deltas and heartbeats to the presence exchange, replies and snapshots to the replies
      exchange, outcome events to the events exchange. Nothing on the work topology, no
      default exchange.
    """
    p = prefix
    node = [f"{p}.node.0194f6c2e5a47b3c8d9e0f1a2b3c4d5e", f"{p}.node.gw-1"]
    presence_q = [f"{p}.presence.019ad9f0c1a27c3e8b4d5f6a7b8c9d0e"]
    reply_q = [f"{p}.reply.019ad9f0c1a27c3e8b4d5f6a7b8c9d0e"]
    # Every app besides `default` has its own work queue {prefix}.work.<app> (bound to the
    # work exchange) and retry tiers {prefix}.retry.<app>.<ms>ms (app names [a-z0-9-]{1,32}).
    app_q = [f"{p}.work.shop", f"{p}.work.merchant-app-2"]
    app_retry = [f"{p}.retry.shop.1000ms", f"{p}.retry.merchant-app-2.300000ms"]
    work = {
        "configure": [f"{p}.work", f"{p}.dead", f"{p}.events", *retry_queues, *app_q, *app_retry],
        "write": [f"{p}.work", f"{p}.dead", *app_q],
        "read": [f"{p}.work", f"{p}.dead", *retry_queues, *app_q, *app_retry],
    }
    # Names no herald user needs: other apps' queues, server-named queues, look-alikes
    # that only an unanchored or too-wide regex would match.
    outside = ["amq.gen-JzTY20BRgKO", "other.work", f"x{p}.work", f"{p}.work.X_y", f"{p}.work.", f"{p}.retry.shop.ms", f"{p}x.dead",
               f"{p}.retry.ms", f"{p}.retry.10msx", f"{p}.node.", "amq.topic",
               f"{p}.presence.", f"{p}.presence.xyz", f"{p}.sessions", f"{p}.reply.",
               f"{p}.reply.xyz", f"{p}.repliesx", "amq.rabbitmq.reply-to"]
    needed = {
        "api": {"configure": [], "write": [f"{p}.work"], "read": []},
        "dispatcher": {
            "configure": work["configure"] + [f"{p}.presence", f"{p}.replies", *presence_q, *reply_q],
            "write": work["write"] + [f"{p}.events", *presence_q, *reply_q, "amq.default"],
            "read": work["read"] + [f"{p}.presence", f"{p}.replies", *presence_q, *reply_q],
        },
        "gateway": {
            "configure": [*node],
            "write": [f"{p}.presence", f"{p}.replies", f"{p}.events"],
            "read": [*node],
        },
    }
    everything = sorted({n for role in needed.values() for names in role.values() for n in names})
    refused = {
        "api": {
            kind: outside + [n for n in everything if n not in needed["api"][kind]]
            for kind in ("configure", "write", "read")
        },
        "dispatcher": {
            "configure": outside + node,
            "write": outside + [f"{p}.presence", f"{p}.replies", *node],
            "read": outside + [f"{p}.events", *node],
        },
        "gateway": {
            # Nothing of the work topology, no exchange to declare (or delete), no queue by
            # name through the default exchange, nobody else's reply queue to read.
            kind: outside + [n for n in everything if n not in needed["gateway"][kind]]
            for kind in ("configure", "write", "read")
        },
    }
    return needed, refused


def event_kinds():
    """The event types herald emits: EventKind::as_str in src/events.rs."""
    return set(re.findall(r'EventKind::\w+ => "([a-z_]+)"', EVENTS_RS.read_text()))


def event_keys():
    """(needed, refused) per publishing role: routing keys on the events exchange
    ({prefix}.events, topic; key <app>.<type>[.<channel>], Event::routing_key in
    src/events.rs) that its TopicPermission's write regex must and must not match.

    - gateway: session_replaced (src/gateway/mod.rs, no channel) and replayed
      (src/gateway/replay.rs, channel live). Never a delivery outcome: a backend deletes a
      device token on token_dead, so a forged one is the attack this closes.
    - dispatcher: the delivery outcomes (src/dispatch/record.rs): delivered and token_dead
      with their channel, the others without.

    Every kind in src/events.rs must belong to one of the two, so a new kind fails here
    until its emitter (and broker-users.yaml) says who may publish it.
    """
    apps = ["default", "shop", "merchant-app-2", "a" * 32]
    kinds = {
        "gateway": {"session_replaced": [None], "replayed": ["live"]},
        "dispatcher": {
            "delivered": ["live", "apns", "fcm"],
            "token_dead": ["apns", "fcm"],
            "expired": [None],
            "dead_lettered": [None],
            "stored": [None],
            "inbox_overflow": [None],
            "replaced": [None],
        },
    }
    problems = []
    known = event_kinds()
    if not known:
        problems.append(f"no EventKind names found in {EVENTS_RS.relative_to(REPO)}")
    for kind in sorted(known - {k for role in kinds.values() for k in role}):
        problems.append(
            f"event kind {kind!r} (src/events.rs) belongs to no role in checks.py event_keys: "
            "say who emits it there and give that role's TopicPermission its routing key"
        )
    for kind in sorted({k for role in kinds.values() for k in role} - known):
        problems.append(f"checks.py event_keys lists {kind!r}, which src/events.rs does not emit")

    def keys(role):
        return [
            f"{app}.{kind}" + (f".{ch}" if ch else "")
            for app in apps
            for kind, channels in kinds[role].items()
            for ch in channels
        ]

    # Keys no role emits: another kind's channel, words out of place, app names herald
    # refuses (too long, upper case, a dot shifting the words).
    outside = ["default.token_dead.live", "default.delivered", "default.replayed", "default.replayed.apns",
               "default.session_replaced.live", "default.expired.apns", "Default.delivered.live",
               "a" * 33 + ".delivered.live", "x.default.delivered.live", "default.delivered.livex",
               ".delivered.live", "default", "#", "default.forged", ""]
    needed = {role: keys(role) for role in kinds}
    refused = {
        "gateway": outside + needed["dispatcher"],
        "dispatcher": outside + needed["gateway"],
    }
    return needed, refused, problems


def regex_problems(where, rx, role, needed, refused):
    """An anchored regex that matches every name in `needed` and none in `refused`."""
    if rx is None:
        return [f"{where}: missing"]
    if rx.strip() in (".*", "^.*$", ".+", "^.+$", ""):
        if rx.strip() != "" or needed:
            return [f"{where}: grants everything (or nothing where {role} needs access)"]
        return []
    problems = []
    if not (rx.startswith("^") and rx.endswith("$")):
        problems.append(f"{where}: not anchored ^...$ (RabbitMQ matches anywhere in the name)")
    try:
        compiled = re.compile(rx)
    except re.error as e:
        return problems + [f"{where}: not a regex: {e}"]
    for name in needed:
        if not compiled.search(name):
            problems.append(f"{where}: does not match {name!r}, which the {role} role uses")
    for name in refused:
        if compiled.search(name):
            problems.append(f"{where}: matches {name!r}, which the {role} role does not need")
    return problems


def cmd_security(path):
    docs = load_docs(path)
    problems = security_problems(docs, DEPLOY / "k8s/overlays" / Path(path).stem)
    count = {
        k: sum(1 for d in docs if d.get("kind") == k)
        for k in ("NetworkPolicy", "Deployment", "RabbitmqCluster", "Cluster")
    }
    return fail(
        problems,
        f"security: {count['NetworkPolicy']} NetworkPolicies over {count['Deployment']} Deployment(s), "
        f"{count['RabbitmqCluster']} RabbitmqCluster(s) and {count['Cluster']} PostgreSQL Cluster(s); "
        f"amqps, per-role broker users, permission regexes, events topic permissions and the "
        f"inbox's TLS, Secret and reach in {Path(path).name}",
    )


def security_problems(docs, overlay_dir):
    """Every lock-down problem of one rendered overlay (see `security` in the module doc)."""
    problems = []
    kinds = {}
    for d in docs:
        kinds.setdefault(d.get("kind"), []).append(d)
    policies = kinds.get("NetworkPolicy", [])
    deployments = kinds.get("Deployment", [])
    clusters = kinds.get("RabbitmqCluster", [])

    def policies_for(labels):
        return [np for np in policies if selects(np["spec"].get("podSelector"), labels)]

    # Every pod behind a NetworkPolicy, both directions for herald.
    for d in deployments:
        rid = resource_id(d)
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        types = {t for np in policies_for(labels) for t in np["spec"].get("policyTypes", ["Ingress"])}
        for t in ("Ingress", "Egress"):
            if t not in types:
                problems.append(f"{rid}: no NetworkPolicy restricts its pods' {t.lower()} (NetworkPolicy missing)")
        # 8080 only from named sources: each peer names a namespace and pods, no IP blocks.
        for np in policies_for(labels):
            for i, rule in enumerate(np["spec"].get("ingress") or []):
                if not admits_port(rule.get("ports"), 8080, ("http",)):
                    continue
                where = f"{resource_id(np)} ingress[{i}] (port 8080 of {rid})"
                if not rule.get("from"):
                    problems.append(f"{where}: admits every source")
                for peer in rule.get("from") or []:
                    if "ipBlock" in peer:
                        problems.append(f"{where}: admits an IP block")
                    elif not narrow(peer.get("namespaceSelector")) or not narrow(peer.get("podSelector")):
                        problems.append(
                            f"{where}: peer {peer} must name both a namespace and pods "
                            "(namespaceSelector and podSelector with labels)"
                        )

    # The broker: its pods behind a policy that admits AMQP only from herald pods, TLS on.
    for rc in clusters:
        rid = resource_id(rc)
        name = rc["metadata"]["name"]
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "rabbitmq"}
        mine = [np for np in policies_for(labels) if "Ingress" in np["spec"].get("policyTypes", ["Ingress"])]
        if not mine:
            problems.append(f"{rid}: no NetworkPolicy restricts ingress to the RabbitMQ pods (NetworkPolicy missing)")
        for np in mine:
            for i, rule in enumerate(np["spec"].get("ingress") or []):
                if not any(admits_port(rule.get("ports"), p, ("amqp", "amqps")) for p in AMQP_PORTS):
                    continue
                where = f"{resource_id(np)} ingress[{i}] (AMQP to {rid})"
                if not rule.get("from"):
                    problems.append(f"{where}: admits every source")
                for peer in rule.get("from") or []:
                    ps = peer.get("podSelector")
                    if set(peer) != {"podSelector"} or not narrow(ps) or not selects(ps, HERALD_POD) \
                            or (ps.get("matchLabels") or {}).get("app.kubernetes.io/name") != "herald":
                        problems.append(f"{where}: peer {peer} is not herald's pods in this namespace")
        tls = rc["spec"].get("tls") or {}
        if not tls.get("secretName"):
            problems.append(f"{rid}: spec.tls.secretName unset: AMQP would be cleartext")
        if tls.get("disableNonTLSListeners") is not True:
            problems.append(f"{rid}: spec.tls.disableNonTLSListeners is not true: cleartext 5672 stays open")
        for d in deployments:
            labels_d = d["spec"]["template"]["metadata"].get("labels", {})
            for np in policies_for(labels_d):
                for i, rule in enumerate(np["spec"].get("egress") or []):
                    to_broker = any(selects(peer.get("podSelector"), labels) for peer in rule.get("to") or [])
                    if to_broker and admits_port(rule.get("ports"), 5672, ("amqp",)):
                        problems.append(f"{resource_id(np)} egress[{i}]: lets herald reach the broker's cleartext 5672")

    if clusters:
        problems += broker_client_problems(docs, kinds, deployments, clusters, overlay_dir)
    problems += inbox_problems(docs, kinds, deployments, policies_for, overlay_dir)
    return problems


def container_roles(c):
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    return env, [r.strip() for r in (env.get("HERALD__ROLES") or "").split(",") if r.strip()]


def mounted_volume(c, volumes, file_path):
    """The volume that provides `file_path` in container `c`, if any."""
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if not file_path.startswith(mp + "/"):
            continue
        v = volumes.get(m["name"], {})
        src = v.get("secret") or v.get("configMap") or {}
        items = src.get("items")
        rel = file_path[len(mp) + 1:]
        if items is None or any(i["path"] == rel for i in items):
            return v
    return None


def inbox_problems(docs, kinds, deployments, policies_for, overlay_dir):
    """The offline inbox's PostgreSQL (CloudNativePG Clusters) and herald's use of it."""
    from urllib.parse import parse_qs, urlsplit

    problems = []
    pg_clusters = [c for c in kinds.get("Cluster", []) if c.get("apiVersion", "").startswith("postgresql.cnpg.io/")]
    defaults, overlay = herald_toml(docs)
    inbox = {**defaults.get("inbox", {}), **overlay.get("inbox", {})}
    if inbox.get("url"):
        problems.append("herald.toml sets inbox.url inline: the database password would sit in a ConfigMap; use url_file")
    if not pg_clusters:
        return problems

    # The server: TLS only, no superuser over the network, its pods behind a policy.
    for pc in pg_clusters:
        rid = resource_id(pc)
        name = pc["metadata"]["name"]
        spec = pc["spec"]
        if spec.get("enableSuperuserAccess") is True:
            problems.append(f"{rid}: enableSuperuserAccess is true: a postgres superuser password in a Secret, usable over the network")
        hba = [" ".join(r.split()) for r in (spec.get("postgresql") or {}).get("pg_hba") or []]
        if "hostnossl all all all reject" not in hba:
            problems.append(f"{rid}: pg_hba has no 'hostnossl all all all reject': cleartext connections stay possible")
        labels = {"cnpg.io/cluster": name, "cnpg.io/podRole": "instance"}
        mine = [np for np in policies_for(labels) if "Ingress" in np["spec"].get("policyTypes", ["Ingress"])]
        if not mine:
            problems.append(f"{rid}: no NetworkPolicy restricts ingress to the PostgreSQL pods (NetworkPolicy missing)")
        for np in mine:
            for i, rule in enumerate(np["spec"].get("ingress") or []):
                if not admits_port(rule.get("ports"), POSTGRES_PORT, ("postgresql", "postgres")):
                    continue
                where = f"{resource_id(np)} ingress[{i}] (5432 of {rid})"
                if not rule.get("from"):
                    problems.append(f"{where}: admits every source")
                for peer in rule.get("from") or []:
                    ps = peer.get("podSelector")
                    if set(peer) == {"podSelector"} and narrow(ps) and selects(ps, labels):
                        continue  # its own instances: replication
                    if set(peer) == {"podSelector"} and narrow(ps) \
                            and (ps.get("matchLabels") or {}).get("app.kubernetes.io/name") == "herald":
                        api_pod = {**HERALD_POD, "app.kubernetes.io/component": "api"}
                        if selects(ps, api_pod) or selects(ps, HERALD_POD):
                            problems.append(f"{where}: peer {peer} admits herald pods other than the dispatcher and gateway (the api role never uses the inbox)")
                        continue
                    if set(peer) == {"namespaceSelector", "podSelector"} and narrow(peer["namespaceSelector"]) \
                            and narrow(ps) and selects(ps, CNPG_OPERATOR_POD):
                        continue  # the operator
                    problems.append(
                        f"{where}: peer {peer} is not herald's dispatcher/gateway pods, the cluster's own "
                        "instances or the CloudNativePG operator"
                    )

    # herald's side: the URL as a mounted Secret file for the inbox roles only, TLS with a
    # mounted CA, and a way out to 5432.
    inbox_secrets = set()
    example = overlay_dir / "secrets.example/inbox-url.example"
    shown = example.relative_to(REPO) if example.is_relative_to(REPO) else example
    url = example.read_text().strip() if example.exists() else None
    if url is None:
        problems.append(f"no {shown} showing the inbox URL")
    else:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.scheme not in ("postgres", "postgresql"):
            problems.append(f"{shown}: the inbox URL is not postgres://")
        mode = (query.get("sslmode") or [None])[0]
        if mode not in INBOX_SSLMODES:
            problems.append(f"{shown}: sslmode is {mode!r}, want one of {', '.join(INBOX_SSLMODES)} (TLS, never a cleartext fallback)")
        elif mode == "require" and not query.get("sslrootcert"):
            problems.append(f"{shown}: sslmode=require without sslrootcert verifies no certificate; add the CA (or use verify-full)")
    rootcert = (parse_qs(urlsplit(url).query).get("sslrootcert") or [None])[0] if url else None
    pg_pods = [{"cnpg.io/cluster": pc["metadata"]["name"], "cnpg.io/podRole": "instance"} for pc in pg_clusters]
    for d in deployments:
        rid = resource_id(d)
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        pod_labels = d["spec"]["template"]["metadata"].get("labels", {})
        for c in pod["containers"]:
            env, roles = container_roles(c)
            if "HERALD__INBOX__URL" in env:
                problems.append(f"{rid}: sets HERALD__INBOX__URL (a password in the pod spec); mount inbox.url_file")
            uses = any(r in INBOX_ROLES for r in roles)
            url_file = env.get("HERALD__INBOX__URL_FILE", inbox.get("url_file") or "")
            if not uses:
                if url_file:
                    problems.append(f"{rid}: runs {roles}, which never use the inbox, yet sets inbox.url_file")
                continue
            if not url_file:
                problems.append(f"{rid}: runs {roles} without inbox.url_file: no durable inbox in cluster mode")
                continue
            vol = mounted_volume(c, volumes, url_file)
            secret = ((vol or {}).get("secret") or {}).get("secretName")
            if not secret:
                problems.append(f"{rid}: no Secret mounted at inbox.url_file {url_file}")
            else:
                inbox_secrets.add(secret)
            if rootcert and not mounted_volume(c, volumes, rootcert):
                problems.append(f"{rid}: nothing mounted at the inbox URL's sslrootcert {rootcert}")
            out = [
                rule for np in policies_for(pod_labels) if "Egress" in np["spec"].get("policyTypes", [])
                for rule in np["spec"].get("egress") or []
                if admits_port(rule.get("ports"), POSTGRES_PORT)
                and any(selects(peer.get("podSelector"), lbl) for peer in rule.get("to") or [] for lbl in pg_pods)
            ]
            if not out:
                problems.append(f"{rid}: no NetworkPolicy egress rule lets it reach PostgreSQL's 5432")
    # The api role holds no inbox credentials.
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        if any(any(r in INBOX_ROLES for r in container_roles(c)[1]) for c in pod["containers"]):
            continue
        for v in pod.get("volumes", []):
            if (v.get("secret") or {}).get("secretName") in inbox_secrets:
                problems.append(f"{resource_id(d)}: mounts the inbox Secret {v['secret']['secretName']}, which its role never uses")
    return problems


def broker_client_problems(docs, kinds, deployments, clusters, overlay_dir):
    """amqps:// with a mounted CA, one non-admin broker user per herald role, and
    permissions that reach what each role uses and nothing else."""
    problems = []
    defaults, overlay = herald_toml(docs)
    queue = {**defaults["queue"], **overlay.get("queue", {})}
    retry = {**defaults["retry"], **overlay.get("retry", {})}
    prefix = queue["prefix"]
    if queue.get("url"):
        problems.append("herald.toml sets queue.url inline: the broker password would sit in a ConfigMap; use url_file")
    for key in ("url_file", "ca_file"):
        if not queue.get(key):
            problems.append(f"herald.toml: queue.{key} unset (the broker is reached over amqps:// with a mounted CA)")
    default_users = {f"{rc['metadata']['name']}-default-user" for rc in clusters}
    users = {u["metadata"]["name"]: u for u in kinds.get("User", [])}
    user_by_secret = {
        (u["spec"].get("importCredentialsSecret") or {}).get("name"): u for u in users.values()
    }
    perms_by_user = {}
    for pm in kinds.get("Permission", []):
        who = (pm["spec"].get("userReference") or {}).get("name") or pm["spec"].get("user")
        perms_by_user.setdefault(who, []).append(pm)
    role_of_user = {}
    seen_secrets = {}
    for d in deployments:
        rid = resource_id(d)
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if (v.get("secret") or {}).get("secretName") in default_users:
                problems.append(f"{rid}: mounts the broker's default (administrator) user Secret {v['secret']['secretName']}")
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            roles = [r.strip() for r in (env.get("HERALD__ROLES") or "").split(",") if r.strip()]
            if "HERALD__QUEUE__URL" in env:
                problems.append(f"{rid}: sets HERALD__QUEUE__URL (a password in the pod spec); mount url_file")
            if env.get("HERALD__QUEUE__CA_FILE", None) == "":
                problems.append(f"{rid}: HERALD__QUEUE__CA_FILE empties queue.ca_file")

            def mounted(file_path):
                """The volume that provides `file_path` in this container, if any."""
                for m in c.get("volumeMounts", []):
                    mp = m["mountPath"].rstrip("/")
                    if not file_path.startswith(mp + "/"):
                        continue
                    v = volumes.get(m["name"], {})
                    src = v.get("secret") or v.get("configMap") or {}
                    items = src.get("items")
                    rel = file_path[len(mp) + 1:]
                    if items is None or any(i["path"] == rel for i in items):
                        return v
                return None

            url_vol = mounted(queue.get("url_file") or "/-")
            if not mounted(queue.get("ca_file") or "/-"):
                problems.append(f"{rid}: nothing mounted at queue.ca_file {queue.get('ca_file')}")
            secret = (url_vol or {}).get("secret", {}).get("secretName")
            if not secret:
                problems.append(f"{rid}: no Secret mounted at queue.url_file {queue.get('url_file')}")
                continue
            if secret in seen_secrets:
                problems.append(f"{rid}: shares its broker Secret {secret} with {seen_secrets[secret]}; one user per role")
            seen_secrets[secret] = rid
            user = user_by_secret.get(secret)
            if secret in default_users or user is None:
                problems.append(
                    f"{rid}: its broker URL Secret {secret} is not the credentials of a User of its "
                    "own (broker-users.yaml), so it would connect as the default/admin user or another"
                )
                continue
            uname = user["metadata"]["name"]
            if user["spec"].get("tags"):
                problems.append(f"User {uname}: has tags {user['spec']['tags']}; herald's users need none")
            if len(roles) != 1:
                problems.append(f"{rid}: runs roles {roles}; production runs one role per user")
                continue
            role_of_user[uname] = roles[0]
            example = overlay_dir / f"secrets.example/url-{roles[0]}.example"
            shown = example.relative_to(REPO) if example.is_relative_to(REPO) else example
            if not example.exists():
                problems.append(f"{rid}: no {shown} showing its broker URL")
            else:
                url = example.read_text().strip()
                if not url.startswith("amqps://"):
                    problems.append(f"{shown}: the queue URL is not amqps://")
                if url.split("://", 1)[-1].split(":", 1)[0] != uname:
                    problems.append(f"{shown}: the URL's user is not {uname}")

    needed, refused = role_resources(prefix, retry_queue_names(prefix, retry))
    for uname, role in sorted(role_of_user.items()):
        pms = perms_by_user.get(uname, [])
        if len(pms) != 1:
            problems.append(f"User {uname}: {len(pms)} Permission objects, want exactly 1")
            continue
        spec = pms[0]["spec"]["permissions"]
        for kind in ("configure", "write", "read"):
            rx = spec.get(kind)
            where = f"Permission {pms[0]['metadata']['name']} {kind} {rx!r}"
            problems += regex_problems(where, rx, role, needed[role][kind], refused[role][kind])
    problems += topic_permission_problems(kinds, role_of_user, perms_by_user, prefix)
    return problems


def topic_permission_problems(kinds, role_of_user, perms_by_user, prefix):
    """Write on the events exchange lets a user publish any routing key there unless a
    TopicPermission narrows it (RabbitMQ's topic authorisation; a user with none on an
    exchange may publish every key): each role that publishes events has exactly one, on
    that exchange in its Permission's vhost, whose write regex matches that role's event
    keys and nothing else, and which binds nothing (read '' or ^$)."""
    events = f"{prefix}.events"
    needed, refused, problems = event_keys()
    tps_by_user = {}
    for tp in kinds.get("TopicPermission", []):
        who = (tp["spec"].get("userReference") or {}).get("name") or tp["spec"].get("user")
        tps_by_user.setdefault(who, []).append(tp)
        exchange = tp["spec"]["permissions"].get("exchange")
        if exchange != events:
            problems.append(
                f"TopicPermission {tp['metadata']['name']}: on exchange {exchange!r}; herald "
                f"publishes to no topic exchange but {events}"
            )
    for uname, role in sorted(role_of_user.items()):
        tps = [tp for tp in tps_by_user.get(uname, []) if tp["spec"]["permissions"].get("exchange") == events]
        if role not in needed:
            continue
        if len(tps) != 1:
            problems.append(
                f"User {uname}: {len(tps)} TopicPermission objects on {events}, want exactly 1 "
                f"(without one the {role} may publish any routing key there, e.g. a forged "
                "default.token_dead.apns)"
            )
            continue
        tp = tps[0]
        name = tp["metadata"]["name"]
        pms = perms_by_user.get(uname, [])
        if pms and tp["spec"].get("vhost") != pms[0]["spec"].get("vhost"):
            problems.append(
                f"TopicPermission {name}: vhost {tp['spec'].get('vhost')!r} is not the vhost of "
                f"{uname}'s Permission ({pms[0]['spec'].get('vhost')!r})"
            )
        spec = tp["spec"]["permissions"]
        rx = spec.get("write")
        problems += regex_problems(
            f"TopicPermission {name} write {rx!r}", rx, role, needed[role], refused[role]
        )
        if spec.get("read", "") not in ("", "^$"):
            problems.append(
                f"TopicPermission {name} read {spec.get('read')!r}: the {role} binds nothing to "
                f"{events}; want '' (no binding key)"
            )
    return problems


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


def family(name):
    """A histogram series' family name (herald_x_bucket -> herald_x); other names as is."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


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


def grouping_labels(expr):
    """-> [(labels of a `by (...)`, names of the metrics it aggregates)] in a PromQL query."""
    import promql_parser

    found = []

    def visit(node):
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None \
                and str(node.modifier.type).endswith("By"):
            inner = []
            promql_parser.walk(
                node.expr, lambda n: inner.append(n.name) if isinstance(n, promql_parser.VectorSelector) else None
            )
            found.append((list(node.modifier.labels), inner))

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
        # `sum by (label)` on a label the metric does not have yields one unlabelled series
        # instead of one per value: a panel or alert that silently stops splitting.
        for labels, names in grouping_labels(grafana_to_promql(expr)):
            if not names or any(n in EXTERNAL_METRICS or n not in exported and family(n) not in exported for n in names):
                continue
            known = set(TARGET_LABELS)
            for n in names:
                known |= exported.get(n, set()) | exported.get(family(n), set())
                known |= {lbl for k in (family(n) + "_bucket", family(n) + "_sum", family(n) + "_count")
                          for lbl in exported.get(k, set())}
            if not all(exported.get(n) or exported.get(family(n)) or exported.get(family(n) + "_bucket") for n in names):
                continue  # a family without labelled samples yet: its labels are unknown
            for lbl in labels:
                if lbl not in known:
                    problems.append(
                        f"{where}: groups by {lbl!r}, which none of {', '.join(sorted(set(names)))} has "
                        f"(has: {', '.join(sorted(known - TARGET_LABELS)) or 'none'})"
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
        "security": lambda: cmd_security(*args),
        "metrics": lambda: cmd_metrics(*args),
        "runbooks": lambda: cmd_runbooks(*args),
    }[cmd]()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
