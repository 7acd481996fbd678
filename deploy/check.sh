#!/usr/bin/env bash
# Checks everything under deploy/ without a cluster or a container engine:
#
#   deploy/check.sh METRICS_FILE
#
# METRICS_FILE is a saved `GET /metrics` of a running herald. The script
#   1. lints deploy/Dockerfile (hadolint, then checkov's Dockerfile policies);
#   2. renders every overlay with `kubectl kustomize`;
#   3. validates each rendered object: built-in kinds strictly against the Kubernetes
#      schemas (kubernetes-validate), custom resources (RabbitmqCluster, CloudNativePG
#      Cluster, ServiceMonitor, PrometheusRule, cert-manager and messaging-topology
#      resources) against deploy/schemas/crds.yaml;
#   4. checks herald's own invariants (probes, drain timing, security context, secrets as
#      read-only files), the lock-down (NetworkPolicies for every pod, 8080, AMQP and
#      PostgreSQL only from named sources, amqps:// with a mounted CA, one least-privilege
#      broker user per role, never the default/admin one, the inbox URL a mounted Secret
#      of the dispatcher and gateway only, with sslmode verify-full against a mounted CA)
#      and runs checkov's Kubernetes policies (skips: deploy/checkov.yaml);
#   5. checks that every metric the Grafana dashboard and the alerts query exists in
#      METRICS_FILE, and that every alert links its runbook in docs/operations.md.
# With HERALD_BUILD_IMAGE=1 it also builds the image with buildah (needs a registry that
# serves the base images, which this project's machines do not reach).
#
# Tools go into target/deploy-venv (pinned in deploy/requirements.txt); a second run
# reuses them. Ends with "deploy checks: N passed, M failed"; exits non-zero on a failure.
set -uo pipefail

if [[ $# -ne 1 || ! -f $1 ]]; then
    echo "usage: deploy/check.sh METRICS_FILE   (a saved /metrics output of herald)" >&2
    exit 2
fi
metrics_file=$(realpath "$1")
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2

venv=target/deploy-venv
out=target/deploy-check
passed=0
failed=0

# run NAME CMD...: one check; its output is shown, its result counted.
run() {
    local name=$1
    shift
    echo "--- $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL $name"
    fi
}

# --- tools ---------------------------------------------------------------------------
# Reinstall only when deploy/requirements.txt changed since the last install.
stamp=$venv/.requirements.sha256
want=$(sha256sum deploy/requirements.txt | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || $(cat "$stamp" 2>/dev/null) != "$want" ]]; then
    echo "--- installing deploy tools into $venv"
    python3 -m venv "$venv" || exit 2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r deploy/requirements.txt || exit 2
    echo "$want" >"$stamp"
fi
py=$venv/bin/python
kubectl=$venv/bin/kubectl
rm -rf "$out" && mkdir -p "$out"

# --- image -----------------------------------------------------------------------------
run "hadolint deploy/Dockerfile" "$venv/bin/hadolint" deploy/Dockerfile
run "checkov deploy/Dockerfile" "$venv/bin/checkov" --config-file deploy/checkov.yaml \
    --framework dockerfile -f deploy/Dockerfile
if [[ ${HERALD_BUILD_IMAGE:-0} == 1 ]]; then
    run "buildah bud -f deploy/Dockerfile" buildah bud --layers -f deploy/Dockerfile -t herald:check .
else
    echo "--- image build skipped: no registry serving rust:/debian: base images is reachable"
    echo "    here; set HERALD_BUILD_IMAGE=1 where one is (needs buildah)"
fi

# --- manifests -------------------------------------------------------------------------
for overlay in deploy/k8s/overlays/*/; do
    name=$(basename "$overlay")
    rendered=$out/$name.yaml
    if ! run "render $name" "$kubectl" kustomize "$overlay" -o "$rendered"; then
        continue
    fi
    run "validate $name" "$py" deploy/checks.py validate "$rendered"
    run "invariants $name" "$py" deploy/checks.py invariants "$rendered"
    run "security $name" "$py" deploy/checks.py security "$rendered"
    if [[ $name == production ]]; then
        run "security checks fail on each undone lock-down" "$py" deploy/test_checks.py "$rendered"
    fi
    run "checkov $name" "$venv/bin/checkov" --config-file deploy/checkov.yaml \
        --framework kubernetes -f "$rendered"
done

# --- monitoring ------------------------------------------------------------------------
run "dashboard and alert metrics exist" "$py" deploy/checks.py metrics "$metrics_file"
run "alert runbooks" "$py" deploy/checks.py runbooks

echo "deploy checks: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
