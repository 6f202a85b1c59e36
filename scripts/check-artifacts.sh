#!/usr/bin/env bash
# Validates mailsender's operations artefacts (docker/, k8s/, postman/, deploy/) with
# real tools, installing them on first use into
#   ${MAILSENDER_CACHE:-$HOME/.cache/mailsender}/venv-tools   (PyPI tools)
#   ${MAILSENDER_CACHE:-$HOME/.cache/mailsender}/npm-tools    (newman)
# and Debian's "prometheus" package for promtool.
#
# Usage:
#   scripts/check-artifacts.sh                 static checks (k8s, compose, Dockerfile, Postman,
#                                              Grafana dashboard and alert rules through promtool)
#   scripts/check-artifacts.sh static          same
#   scripts/check-artifacts.sh install         only install the tools
#   scripts/check-artifacts.sh newman BASE_URL [ADMIN_TOKEN] [--with-halt]
#        run the Postman collection against a live service (folder "api";
#        with --with-halt also folder "lifecycle", i.e. POST /halt, last)
#   scripts/check-artifacts.sh promtool [--raw] FILE_OR_URL
#        "promtool check metrics" on a metrics file, URL (e.g.
#        http://localhost:8000/metrics) or "-" for stdin; OpenMetrics input
#        is first translated to the classic text format unless --raw
#
# Environment: MAILSENDER_CACHE (tool cache), K8S_VERSION (Kubernetes schema
# version for kubernetes-validate, default below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MAILSENDER_CACHE:-$HOME/.cache/mailsender}"
VENV="$CACHE/venv-tools"
NPM_DIR="$CACHE/npm-tools"
PY="$VENV/bin/python"

# Pinned tool versions (bump deliberately).
PY_TOOLS=(
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "dockerfile-parse==2.0.1"
  "PyYAML==6.0.3"
)
NEWMAN_VERSION="6.2.2"
# Must be one of the versions kubernetes-validate ships schemas for
# (kubernetes-validate --help lists them).
K8S_VERSION="${K8S_VERSION:-1.32.0}"

# Every environment variable mailsender reads: a misspelt key in the
# ConfigMap, Secret or compose file would silently fall back to a default.
KNOWN_ENV="KAFKA_BROKERS KAFKA_TOPIC_MAILSENDER KAFKA_TOPIC_PROFILE KAFKA_TOPIC_DLQ
KAFKA_GROUPID KAFKA_GROUP_INSTANCE_ID KAFKA_TOPIC_PARTITIONS MONGO_LOCAL
MONGO_NODEPORT_SVC_SERVICE_HOST MONGO_NODEPORT_SVC_SERVICE_PORT MONGODB_USERNAME
MONGODB_PASSWORD MONGODB_BASE_NAME MONGODB_COLLECTION SMTP_HOST SMTP_PORT SMTP_USER
SMTP_PASSWORD SMTP_FROM SMTP_TLS SMTP_TLS_INSECURE_SKIP_VERIFY SMTP_TLS_CA_FILE
SMTP_MAX_SENDERS SMTP_RATE_LIMIT_PERIOD SMTP_RATE_LIMIT_MAX_LETTERS SMTP_RATE_LIMIT_BURST
SMTP_TIMEOUT SMTP_MAX_ATTEMPTS RETRY_BACKOFF_BASE RETRY_BACKOFF_MAX LEASE_DURATION
SHUTDOWN_TIMEOUT HTTP_ADDR HTTP_MAX_BODY_BYTES ADMIN_TOKEN ADMIN_ALLOWED_NETWORKS INSTANCE_ID LOG_FORMAT RUST_LOG
KAFKA_SESSION_TIMEOUT KAFKA_CREATE_TOPICS INGEST_BATCH INGEST_LINGER SMTP_HELO_NAME
CLAIM_BATCH DISPATCH_POLL_INTERVAL LANE_BULK_SHARE REPUBLISH_INTERVAL HOSTNAME SMTP_MAX_RECIPIENTS
SMTP_TIMEOUT_CONNECT SMTP_TIMEOUT_GREETING SMTP_TIMEOUT_COMMAND SMTP_TIMEOUT_DATA SMTP_TIMEOUT_DATA_END
SMTP_TIMEOUT_RSET SMTP_IDLE_CHECK_AFTER SMTP_THROTTLE_RECOVERY_STEP STATUS_BODY_MAX_BYTES
KAFKA_MAX_MESSAGE_BYTES KAFKA_DLQ_MAX_BYTES KAFKA_STALL_WARNING LETTER_RETENTION LETTER_RETENTION_INTERVAL
DISPATCH_MAX_BYTES KAFKA_MESSAGE_TIMEOUT KAFKA_STATISTICS_INTERVAL REPUBLISH_BATCH
DKIM_DOMAIN DKIM_SELECTOR DKIM_PRIVATE_KEY_FILE LIST_UNSUBSCRIBE_URL LIST_UNSUBSCRIBE_MAILTO
UNSUBSCRIBE_SECRET PUBLIC_HTTP_ADDR KAFKA_TOPIC_UNSUBSCRIBED KAFKA_TOPIC_SUPPRESSIONS
SMTP_RELAY_BREAKER_FAILURES SMTP_RELAY_BREAKER_COOLDOWN
SUPPRESS_AFTER_HARD_BOUNCES SMTP_DELIVERY SMTP_QUOTAS SMTP_RATE_LIMIT_UNIT
HTTP_POST_TIMEOUT HTTP_IDEMPOTENCY_WINDOW
BOUNCE_DOMAIN BOUNCE_SECRET BOUNCE_LOCAL_PART FEEDBACK_SMTP_ADDR FEEDBACK_LOOP_ADDRESS
FEEDBACK_MAX_BYTES KAFKA_TOPIC_FEEDBACK
MAILGUN_WEBHOOK_SIGNING_KEY SENDGRID_WEBHOOK_PUBLIC_KEY POSTMARK_WEBHOOK_USER POSTMARK_WEBHOOK_PASSWORD
SNS_TOPIC_ARNS SNS_SIGNING_CERT_FILE SMTP_SANDBOX
BRAKE_MAX_BOUNCE_RATE BRAKE_MAX_COMPLAINT_RATE BRAKE_WINDOW BRAKE_MIN_SENDS BRAKE_INTERVAL
ATTACHMENTS_MAX_COUNT ATTACHMENTS_MAX_BYTES"
export KNOWN_ENV

COLLECTION="$ROOT/postman/mailsender.postman_collection.json"
ENVIRONMENT="$ROOT/postman/localhost.postman_environment.json"
COMPOSE="$ROOT/docker/docker-compose.yml"
DOCKERFILE="$ROOT/docker/Dockerfile"

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

# ---------------------------------------------------------------- installers
ensure_py_tools() {
  local stamp="$VENV/.mailsender-tools" want
  want="$(printf '%s\n' "${PY_TOOLS[@]}")"
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  local t0=$SECONDS
  log "installing ${PY_TOOLS[*]} into $VENV ..."
  mkdir -p "$CACHE"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}" >&2
  printf '%s\n' "$want" >"$stamp"
  log "python tools installed in $((SECONDS - t0))s"
}

newman_bin() { printf '%s\n' "$NPM_DIR/node_modules/.bin/newman"; }

ensure_newman() {
  command -v node >/dev/null || die "node is required for newman"
  if [[ -x "$(newman_bin)" ]] && [[ "$("$(newman_bin)" --version 2>/dev/null)" == "$NEWMAN_VERSION" ]]; then
    return 0
  fi
  local t0=$SECONDS
  log "installing newman@$NEWMAN_VERSION into $NPM_DIR ..."
  mkdir -p "$NPM_DIR"
  [[ -f "$NPM_DIR/package.json" ]] || printf '{ "name": "mailsender-npm-tools", "private": true }\n' >"$NPM_DIR/package.json"
  npm install --prefix "$NPM_DIR" --no-audit --no-fund --loglevel=error \
    "newman@$NEWMAN_VERSION" >&2
  log "newman installed in $((SECONDS - t0))s"
}

ensure_promtool() {
  command -v promtool >/dev/null && return 0
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "promtool missing and not root: apt-get install prometheus"
    sudo=(sudo)
  fi
  local t0=$SECONDS
  log "installing Debian package prometheus (for promtool) ..."
  mkdir -p "$CACHE"
  local aptlog="$CACHE/apt-prometheus.log"
  # The package also ships the Prometheus server and a systemd unit; it is
  # not started here (no systemd; invoke-rc.d's policy denies it).
  if ! { "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq &&
         "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
           apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends prometheus; } >"$aptlog" 2>&1; then
    tail -n 20 "$aptlog" >&2
    die "apt-get install prometheus failed (log: $aptlog)"
  fi
  command -v promtool >/dev/null || die "promtool still missing after installing prometheus"
  log "promtool installed in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- reporting
PASSED=0
FAILED=0
SKIPPED=0
# run_check NAME CMD...: runs CMD, prints "PASS NAME" / "FAIL NAME" (+ output).
run_check() {
  local name="$1"; shift
  local out rc=0
  out="$("$@" 2>&1)" || rc=$?
  if [[ $rc -eq 0 ]]; then
    PASSED=$((PASSED + 1))
    printf 'PASS  %s\n' "$name"
  else
    FAILED=$((FAILED + 1))
    printf 'FAIL  %s (exit %d)\n' "$name" "$rc"
  fi
  if [[ -n "$out" && ( $rc -ne 0 || -n "${VERBOSE:-}" ) ]]; then
    printf '%s\n' "$out" | sed 's/^/      | /'
  fi
}
skip_check() {
  SKIPPED=$((SKIPPED + 1))
  printf 'SKIP  %s (%s)\n' "$1" "$2"
}

# ---------------------------------------------------------------- k8s checks
check_k8s_file() {
  "$VENV/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict "$1"
}

check_kustomize() {
  # Every manifest except the secret template must be listed, and (when
  # kubectl is around) the rendered kustomization must validate as well.
  # (run_check runs this in an "||" context, where set -e is off: hence the
  # explicit "|| return".)
  "$PY" - "$ROOT/k8s" <<'PY' || return 1
import sys, pathlib, yaml
d = pathlib.Path(sys.argv[1])
k = yaml.safe_load((d / "kustomization.yaml").read_text())
assert k.get("kind") == "Kustomization", "kustomization.yaml: kind must be Kustomization"
res = k.get("resources") or []
want = sorted(p.name for p in d.glob("*.yaml")
              if p.name not in ("kustomization.yaml", "secret.example.yaml"))
missing = sorted(set(want) - set(res))
extra = sorted(r for r in res if not (d / r).exists())
assert "secret.example.yaml" not in res, "secret.example.yaml must not be listed"
assert not missing, f"not listed in kustomization.yaml: {missing}"
assert not extra, f"listed but missing: {extra}"
print("resources:", ", ".join(res))
PY
  if command -v kubectl >/dev/null; then
    local rendered rc=0
    rendered="$(mktemp --suffix=.yaml)"
    kubectl kustomize "$ROOT/k8s" >"$rendered" || rc=$?
    if [[ $rc -eq 0 ]]; then
      "$VENV/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict "$rendered" || rc=$?
    fi
    rm -f "$rendered"
    return $rc
  else
    echo "kubectl not found: rendered output not validated"
  fi
}

check_k8s_consistency() {
  "$PY" - "$ROOT/k8s" <<'PY'
import re, sys, pathlib, yaml
d = pathlib.Path(sys.argv[1])
docs = {}
for p in d.glob("*.yaml"):
    for doc in yaml.safe_load_all(p.read_text()):
        if doc:
            docs[(doc["kind"], doc["metadata"]["name"]) if "metadata" in doc else (doc["kind"], p.name)] = doc
def get(kind):
    found = [v for (k, _), v in docs.items() if k == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]
dep, svc, cm, sec, pdb = (get(k) for k in ("Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"))
errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)

spec = dep["spec"]; pod = spec["template"]["spec"]; tmpl_labels = spec["template"]["metadata"]["labels"]
sel = spec["selector"]["matchLabels"]
check(all(tmpl_labels.get(k) == v for k, v in sel.items()), "deployment selector does not match its pod labels")
check(all(tmpl_labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "service selector does not match pod labels")
check(all(tmpl_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "PDB selector does not match pod labels")
check(spec.get("replicas", 1) >= 2, "replicas should be >= 2")
check(pdb["spec"].get("minAvailable") == 1, "PDB minAvailable should be 1")
check(pdb["spec"].get("minAvailable", 0) < spec.get("replicas", 1), "PDB minAvailable must be < replicas or nodes can never drain")

(c,) = [c for c in pod["containers"] if c["name"] == "mailsender"]
ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
check(ports.get("http") == 8000, "container port named http must be 8000")
sp = svc["spec"]["ports"]
check(any(p.get("name") == "http" and p["port"] == 8000 and p.get("targetPort") in ("http", 8000) for p in sp), "service must expose port 8000 named http")
check(svc["spec"].get("type", "ClusterIP") == "ClusterIP", "service type must be ClusterIP")

ann = spec["template"]["metadata"].get("annotations", {})
check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "8000"
      and ann.get("prometheus.io/path") == "/metrics", "pod template needs prometheus.io scrape/port/path annotations")

check(c["livenessProbe"]["httpGet"]["path"] == "/health", "liveness probe must hit /health")
check(c["readinessProbe"]["httpGet"]["path"] == "/ready", "readiness probe must hit /ready")
res = c.get("resources", {})
check(bool(res.get("requests")) and bool(res.get("limits")), "resources requests and limits required")

refs = {e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])} | {e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])}
check(cm["metadata"]["name"] in refs, "envFrom must reference the ConfigMap")
check(sec["metadata"]["name"] in refs, "envFrom must reference the Secret")
check(sec.get("type") == "Opaque" and "stringData" in sec, "secret example must be type Opaque with stringData")
for key in ("MONGODB_PASSWORD", "SMTP_PASSWORD", "ADMIN_TOKEN"):
    check(key in sec.get("stringData", {}), f"secret example lacks {key}")
    check(key not in cm["data"], f"{key} is a secret and must not be in the ConfigMap")
for key in ("KAFKA_BROKERS", "SMTP_HOST"):
    check(key in cm["data"], f"ConfigMap lacks required {key}")

env = {e["name"]: e for e in c.get("env", [])}
import os
known = set(os.environ["KNOWN_ENV"].split()) | {"POD_NAME"}
for where, keys in (("ConfigMap", cm["data"]), ("Secret", sec.get("stringData", {})), ("container env", env)):
    unknown = sorted(set(keys) - known)
    check(not unknown, f"{where}: unknown variable(s) {unknown} (typo?)")
check(env.get("INSTANCE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
      "INSTANCE_ID must come from metadata.name (downward API)")
# The service refuses HTTP_ADDR beyond loopback without ADMIN_TOKEN unless ADMIN_ALLOWED_NETWORKS is
# set (a service mesh makes every peer loopback): the manifests must satisfy that rule.
addr = str(cm["data"].get("HTTP_ADDR", "0.0.0.0:8000"))
host = addr.rsplit(":", 1)[0].strip("[]")
loopback = host == "::1" or host.startswith("127.")
token_ref = env.get("ADMIN_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
token = token_ref.get("name") == sec["metadata"]["name"] and token_ref.get("key") == "ADMIN_TOKEN" \
    and not token_ref.get("optional", False)
check(loopback or token or "ADMIN_ALLOWED_NETWORKS" in cm["data"],
      f"HTTP_ADDR {addr} is beyond loopback: ADMIN_TOKEN must come from the Secret (a required secretKeyRef) "
      "or ADMIN_ALLOWED_NETWORKS be set, or the service refuses to start")
# A Deployment renames pods on every rollout; static membership would strand partitions.
check("KAFKA_GROUP_INSTANCE_ID" not in env and "KAFKA_GROUP_INSTANCE_ID" not in cm["data"],
      "KAFKA_GROUP_INSTANCE_ID must not be set on a Deployment (use it with a StatefulSet)")

def seconds(s):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", str(s).strip())
    assert m, f"cannot parse duration {s!r}"
    n, u = int(m.group(1)), m.group(2) or "s"
    return n / 1000 if u == "ms" else n * 60 if u == "m" else n
shutdown = seconds(cm["data"].get("SHUTDOWN_TIMEOUT", "20s"))
grace = pod.get("terminationGracePeriodSeconds", 30)
pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
m = re.search(r"sleep\s+(\d+)", " ".join(pre))
pre_sleep = int(m.group(1)) if m else 0
check(bool(pre), "preStop hook required")
check(grace > shutdown + pre_sleep,
      f"terminationGracePeriodSeconds ({grace}) must exceed preStop sleep ({pre_sleep}) + SHUTDOWN_TIMEOUT ({shutdown})")

psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
check(psc.get("runAsNonRoot") or csc.get("runAsNonRoot"), "runAsNonRoot required")
check(isinstance(psc.get("runAsUser", csc.get("runAsUser")), int) and psc.get("runAsUser", csc.get("runAsUser")) != 0,
      "numeric non-zero runAsUser required (image USER must be verifiable)")
check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem required")
check(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false required")
check(csc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities.drop [ALL] required")

if errors:
    print("\n".join(errors)); sys.exit(1)
print(f"ok: grace {grace}s > preStop {pre_sleep}s + shutdown {shutdown}s")
PY
}

# ---------------------------------------------------------------- compose checks
check_compose_cli() {
  docker compose -f "$COMPOSE" config -q
}

check_compose_schema() {
  # check-jsonschema vendors the compose-spec schema (Apache-2.0); no network.
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE"
}

check_compose_refs() {
  "$PY" - "$COMPOSE" <<'PY'
import sys, pathlib, yaml
path = pathlib.Path(sys.argv[1]).resolve()
base = path.parent
doc = yaml.safe_load(path.read_text())
svcs = doc["services"]
errors = []
for name, s in svcs.items():
    b = s.get("build")
    if b is not None:
        if isinstance(b, str):
            b = {"context": b}
        ctx = (base / b.get("context", ".")).resolve()
        if not ctx.is_dir():
            errors.append(f"{name}: build context {ctx} is not a directory")
        df = ctx / b.get("dockerfile", "Dockerfile")
        if not df.is_file():
            errors.append(f"{name}: dockerfile {df} not found")
        if ctx.is_dir() and not (ctx / "Cargo.toml").is_file() and name == "mailsender":
            errors.append(f"{name}: build context {ctx} is not the repository root")
    ef = s.get("env_file", [])
    for e in ([ef] if isinstance(ef, (str, dict)) else ef):
        p = e["path"] if isinstance(e, dict) else e
        req = e.get("required", True) if isinstance(e, dict) else True
        if req and not (base / p).is_file():
            errors.append(f"{name}: env_file {p} not found")
    deps = s.get("depends_on", {})
    for d in (deps if isinstance(deps, list) else deps.keys()):
        if d not in svcs:
            errors.append(f"{name}: depends_on unknown service {d}")
    for v in s.get("volumes", []):
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith((".", "/")) and not (base / src).exists():
            errors.append(f"{name}: bind mount source {src} not found")
        elif src and not src.startswith((".", "/")) and src not in (doc.get("volumes") or {}):
            errors.append(f"{name}: named volume {src} not declared")
ms = svcs.get("mailsender")
if not ms:
    errors.append("no mailsender service")
else:
    env = ms.get("environment", {})
    if isinstance(env, list):
        env = dict(x.split("=", 1) for x in env)
    for key in ("KAFKA_BROKERS", "SMTP_HOST"):
        if key not in env:
            errors.append(f"mailsender: {key} not set")
    import os
    unknown = sorted(set(env) - set(os.environ["KNOWN_ENV"].split()))
    if unknown:
        errors.append(f"mailsender: unknown variable(s) {unknown} (typo?)")
    if env.get("SMTP_TLS") != "none":
        errors.append("mailsender: SMTP_TLS should be none for Mailpit")
    if "healthcheck" not in ms:
        errors.append("mailsender: no healthcheck")
    for d, cond in (ms.get("depends_on") or {}).items():
        if isinstance(cond, dict) and cond.get("condition") == "service_healthy" and "healthcheck" not in svcs[d]:
            errors.append(f"mailsender waits for {d} to be healthy, but {d} has no healthcheck")
if errors:
    print("\n".join(errors)); sys.exit(1)
print("services:", ", ".join(svcs))
PY
}

# ---------------------------------------------------------------- Dockerfile check
check_dockerfile() {
  "$PY" - "$DOCKERFILE" <<'PY'
import sys, pathlib, re
from dockerfile_parse import DockerfileParser
path = pathlib.Path(sys.argv[1])
dfp = DockerfileParser(path=str(path))
ins = dfp.structure
errors = []
stages = []          # [(name, [instructions])]
for i in ins:
    if i["instruction"] == "FROM":
        parts = i["value"].split()
        stages.append((parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None, []))
    elif stages:
        stages[-1][1].append(i)
if len(stages) < 2:
    errors.append("expected a multi-stage build (builder + runtime)")
froms = [i["value"] for i in ins if i["instruction"] == "FROM"]
args = {}
for i in ins:
    if i["instruction"] == "ARG" and "=" in i["value"]:
        k, v = i["value"].split("=", 1); args[k.strip()] = v.strip()
resolved = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), f.split()[0]) for f in froms]
if not any(r.startswith("rust:") and "bookworm" in r for r in resolved):
    errors.append(f"no rust:*-bookworm builder stage (FROM {resolved})")
if not resolved[-1].startswith("debian:bookworm-slim"):
    errors.append(f"runtime stage should be debian:bookworm-slim, is {resolved[-1]}")
runs = [i["value"] for _, body in stages[:-1] for i in body if i["instruction"] == "RUN"]
builds = [r for r in runs if "cargo build" in r]
if not builds or not all("cargo build --release --locked" in r for r in builds):
    errors.append("builder must run `cargo build --release --locked`")
if len(builds) < 2:
    errors.append("expected a dependency-caching cargo build before copying the sources")
final = stages[-1][1]
users = [i["value"].strip() for i in final if i["instruction"] == "USER"]
if not users:
    errors.append("runtime stage has no USER")
elif users[-1].split(":")[0] in ("root", "0"):
    errors.append(f"runtime USER is root ({users[-1]})")
if not any(i["instruction"] == "HEALTHCHECK" and "/health" in i["value"] for i in final):
    errors.append("runtime stage has no HEALTHCHECK hitting /health")
if not any(i["instruction"] == "EXPOSE" and "8000" in i["value"].split() for i in final):
    errors.append("runtime stage must EXPOSE 8000")
if not any(i["instruction"] == "RUN" and "ca-certificates" in i["value"] for i in final):
    errors.append("runtime stage must install ca-certificates")
if not any(i["instruction"] in ("ENTRYPOINT", "CMD") and "mailsender" in i["value"] for i in final):
    errors.append("runtime stage must run the mailsender binary")
names = {n for n, _ in stages if n}
for i in final:
    m = re.search(r"--from=(\S+)", i["value"]) if i["instruction"] == "COPY" else None
    if m and m.group(1) not in names:
        errors.append(f"COPY --from={m.group(1)}: no such stage")
ign = path.with_name(path.name + ".dockerignore")
if not ign.is_file():
    errors.append(f"{ign.name} missing")
else:
    pats = {l.strip() for l in ign.read_text().splitlines() if l.strip() and not l.startswith("#")}
    for need in ((".git",), ("target", "**/target", "/target")):
        if not pats & set(need):
            errors.append(f"{ign.name} does not exclude {need[0]}")
    for must_keep in ("src", "Cargo.toml", "Cargo.lock"):
        if must_keep in pats:
            errors.append(f"{ign.name} excludes {must_keep}, which the build needs")
if errors:
    print("\n".join(errors)); sys.exit(1)
print(f"stages: {[n for n, _ in stages]}, USER {users[-1]}, base images {resolved}")
PY
}

# ---------------------------------------------------------------- Postman checks
check_collection() {
  # Loads the collection with postman-collection (the SDK newman itself uses),
  # compiles every script, and checks folders / request order / tests.
  NODE_PATH="$NPM_DIR/node_modules/newman/node_modules:$NPM_DIR/node_modules" \
  node - "$COLLECTION" "$ENVIRONMENT" <<'JS'
const fs = require("fs");
const vm = require("vm");
const { Collection, VariableScope } = require("postman-collection");
const [file, envFile] = process.argv.slice(2);
const raw = JSON.parse(fs.readFileSync(file, "utf8"));
const env = JSON.parse(fs.readFileSync(envFile, "utf8"));
const errors = [];
const check = (cond, msg) => { if (!cond) errors.push(msg); };
check(raw.info && /collection\/v2\.1\.0\/collection\.json$/.test(raw.info.schema), "info.schema must be Postman v2.1.0");
const col = new Collection(raw);
const folders = col.items.map((f) => f.name);
check(JSON.stringify(folders) === JSON.stringify(["api", "lifecycle"]), `top-level folders must be [api, lifecycle], got ${folders}`);
const all = [];
col.forEachItem((item) => all.push(item));
for (const item of all) {
  const url = item.request.url.toString();
  check(url.startsWith("{{baseUrl}}"), `${item.name}: URL must start with {{baseUrl}} (${url})`);
  const tests = item.events.filter((e) => e.listen === "test");
  check(tests.length > 0, `${item.name}: no test script`);
  for (const ev of item.events.all()) {
    const src = ev.script.toSource();
    try { new vm.Script(src, { filename: `${item.name} [${ev.listen}]` }); }
    catch (e) { errors.push(`${item.name} [${ev.listen}]: ${e.message}`); }
    if (ev.listen === "test") check(/pm\.test\(/.test(src), `${item.name}: test script has no pm.test`);
  }
}
const path = (i) => `${i.request.method} /${i.request.url.getPath(true).replace(/^\//, "")}`;
const seen = all.map(path);
for (const need of ["POST /post", "GET /health", "GET /ready", "GET /metrics", "POST /halt", "GET /"])
  check(seen.includes(need), `missing request ${need}`);
check(seen[seen.length - 1] === "POST /halt", "POST /halt must be the last request");
check(seen.filter((s) => s === "POST /halt").length === 1, "exactly one POST /halt");
const apiPaths = col.items.one("api") ? [] : null;
col.items.idx(0).forEachItem((i) => check(path(i) !== "POST /halt", "POST /halt must not be in folder api"));
const post = all.find((i) => path(i) === "POST /post" && /batch/.test(i.name));
if (post) {
  const batch = JSON.parse(post.request.body.raw);
  check(Array.isArray(batch) && batch.length === 2, "sample batch must hold 2 mailings");
  for (const m of batch) {
    check(["Subject", "Body", "Addresses", "Token"].every((k) => k in m), "mailing lacks Subject/Body/Addresses/Token");
    check(Array.isArray(m.Addresses) && m.Addresses.length === 2 && m.Addresses.every((a) => /@example\.com$/.test(a)),
      "each mailing needs 2 @example.com addresses");
  }
} else errors.push("no POST /post batch request");
check(col.auth && col.auth.type === "bearer" && JSON.stringify(col.auth.toJSON()).includes("{{adminToken}}"),
  "collection auth must be bearer {{adminToken}}");
const envVars = new VariableScope(env.values);
check(envVars.get("baseUrl") === "http://localhost:8000", "environment baseUrl must be http://localhost:8000");
check(envVars.has("adminToken") && envVars.get("adminToken") === "", "environment adminToken must exist and be empty");
if (errors.length) { console.log(errors.join("\n")); process.exit(1); }
console.log(`${all.length} requests: ${seen.join(", ")}`);
JS
}

check_newman_loads() {
  # newman itself parses the collection + environment: a run of a folder
  # name that does not exist fails *after* loading, with a known message.
  local out
  out="$("$(newman_bin)" run "$COLLECTION" -e "$ENVIRONMENT" --folder __no_such_folder__ --reporters cli 2>&1 || true)"
  if grep -q 'Unable to find a folder or request: "\?__no_such_folder__' <<<"$out"; then
    echo "newman loaded collection and environment"
  else
    printf '%s\n' "$out"; return 1
  fi
}

# ---------------------------------------------------------------- dashboard and alert rules
DASHBOARD="$ROOT/deploy/grafana/mailsender.json"
ALERTS="$ROOT/deploy/prometheus/mailsender-alerts.yaml"
ALERT_TESTS="$ROOT/deploy/prometheus/mailsender-alerts.test.yaml"

check_dashboard_json() {
  # Valid JSON that Grafana can import: every query uses the ${datasource} variable, panel ids are
  # unique, and no Grafana variable is used that the dashboard does not define.
  python3 - "$DASHBOARD" <<'PY'
import json, re, sys
d = json.load(open(sys.argv[1], encoding="utf-8"))
errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)
check(isinstance(d.get("title"), str) and d.get("uid") == "mailsender", "title and uid 'mailsender' required")
check(isinstance(d.get("schemaVersion"), int), "schemaVersion required")
variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
ds = variables.get("datasource", {})
check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
      "templating needs a variable 'datasource' of type datasource, query prometheus")
panels = []
def walk(ps):
    for p in ps:
        panels.append(p)
        walk(p.get("panels", []))
walk(d.get("panels", []))
ids = [p.get("id") for p in panels]
check(len(ids) == len(set(ids)) and None not in ids, f"panel ids missing or not unique: {ids}")
builtin = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
targets = 0
for p in panels:
    if p.get("type") == "row":
        continue
    name = p.get("title", p.get("id"))
    check(p.get("targets"), f"panel {name!r} has no queries")
    check(set(p.get("gridPos", {})) >= {"h", "w", "x", "y"}, f"panel {name!r} lacks a gridPos")
    for t in p.get("targets", []):
        targets += 1
        check(t.get("datasource", p.get("datasource", {})).get("uid") == "${datasource}",
              f"panel {name!r} query {t.get('refId')}: datasource must be ${{datasource}}")
        check(bool(t.get("expr", "").strip()), f"panel {name!r} query {t.get('refId')}: empty expr")
for v in variables.values():
    if v.get("type") == "query":
        check(v.get("datasource", {}).get("uid") == "${datasource}", f"variable {v['name']}: datasource must be ${{datasource}}")
for var in set(re.findall(r"\$\{?(\w+)", json.dumps(d))):
    check(var in variables or var in builtin, f"unknown Grafana variable ${var}")
if errors:
    print("\n".join(errors)); sys.exit(1)
print(f"{len(panels)} panels, {targets} queries, variables {sorted(variables)}")
PY
}

# dashboard_rules OUT: writes every PromQL expression of the dashboard (panel queries and the
# selectors of label_values() variables) as recording rules, Grafana variables replaced.
dashboard_rules() {
  python3 - "$DASHBOARD" "$1" <<'PY'
import json, re, sys
d = json.load(open(sys.argv[1], encoding="utf-8"))
builtin = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h",
           "__interval_ms": "60000", "__range_s": "3600", "__range_ms": "3600000"}
variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
def substitute(expr, where):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name in builtin:
            return builtin[name]
        if name in variables:
            return ".*"   # query variables are used in regex matchers: =~"$job"
        sys.exit(f"{where}: unknown variable ${name}")
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)
rules = []
def walk(ps):
    for p in ps:
        for t in p.get("targets", []):
            where = f"panel {p.get('id')} {p.get('title')!r} query {t.get('refId')}"
            rules.append({"record": f"dashboard:panel_{p.get('id')}:{t.get('refId')}",
                          "expr": substitute(t["expr"], where),
                          "labels": {"panel": str(p.get("title"))}})
        walk(p.get("panels", []))
walk(d.get("panels", []))
for v in d.get("templating", {}).get("list", []):
    if v.get("type") != "query":
        continue
    q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
    if not m:
        sys.exit(f"variable {v['name']}: only label_values(SELECTOR, LABEL) is checked, not {q!r}")
    rules.append({"record": f"dashboard:variable:{v['name']}", "expr": substitute(m.group(1), v["name"])})
# JSON is YAML: promtool reads it as a rule file.
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"), indent=1)
print(f"{len(rules)} expressions")
PY
}

check_dashboard_exprs() {
  local dir rc=0
  dir="$(mktemp -d)"
  dashboard_rules "$dir/dashboard-rules.yaml" || rc=$?
  [[ $rc -eq 0 ]] && { promtool check rules --lint=all --lint-fatal "$dir/dashboard-rules.yaml" || rc=$?; }
  rm -rf "$dir"
  return $rc
}

check_alert_rules() {
  promtool check rules --lint=all --lint-fatal "$ALERTS"
}

check_alert_tests() {
  promtool test rules "$ALERT_TESTS"
}

check_alert_tests_cover_every_alert() {
  # Every alert has a test in which it fires and one, at a time past its `for:`, in which it must
  # not; promtool has just run them, so each alert is shown to fire and to stay quiet. As a check
  # of the check, the tests must fail once with every alert made to fire always.
  local dir rc=0
  dir="$(mktemp -d)"
  cp "$ALERT_TESTS" "$dir/tests.yaml"
  "$PY" - "$ALERTS" "$ALERT_TESTS" "$dir" <<'PY' || rc=$?
import pathlib, re, subprocess, sys, yaml
rules = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
tests = yaml.safe_load(open(sys.argv[2], encoding="utf-8"))
def minutes(d):
    return sum(int(n) * {"s": 1 / 60, "m": 1, "h": 60}[u] for n, u in re.findall(r"(\d+)([smh])", d or "0m"))
alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
fires, quiet, errors = set(), set(), []
for t in tests["tests"]:
    for a in t.get("alert_rule_test", []):
        name = a["alertname"]
        if name not in alerts:
            errors.append(f"test {t.get('name')!r} names unknown alert {name}")
        elif a.get("exp_alerts"):
            fires.add(name)
        elif minutes(a["eval_time"]) >= minutes(alerts[name].get("for")):
            quiet.add(name)
for name in alerts:
    if name not in fires:
        errors.append(f"{name}: no test in which it fires")
    if name not in quiet:
        errors.append(f"{name}: no test (past its for:) in which it must not fire")
for g in rules["groups"]:
    for r in g["rules"]:
        r["expr"] = "vector(1)"
dir = pathlib.Path(sys.argv[3])
(dir / pathlib.Path(sys.argv[1]).name).write_text(yaml.safe_dump(rules))
if subprocess.run(["promtool", "test", "rules", str(dir / "tests.yaml")], capture_output=True).returncode == 0:
    errors.append("the tests pass with every alert always firing")
if errors:
    print("\n".join(errors)); sys.exit(1)
print(f"{len(alerts)} alerts, each with a firing and a quiet test; broken rules fail the tests")
PY
  rm -rf "$dir"
  return $rc
}

static_checks() {
  ensure_py_tools
  ensure_newman
  echo "== k8s (kubernetes-validate, Kubernetes $K8S_VERSION, --strict)"
  local f
  for f in "$ROOT"/k8s/*.yaml; do
    [[ "$(basename "$f")" == kustomization.yaml ]] && continue
    run_check "k8s/$(basename "$f") validates" check_k8s_file "$f"
  done
  run_check "k8s/kustomization.yaml lists all manifests; rendered output validates" check_kustomize
  run_check "k8s manifests are consistent (selectors, probes, grace period, security)" check_k8s_consistency
  echo "== docker compose"
  if docker compose version >/dev/null 2>&1; then
    run_check "docker compose config -q" check_compose_cli
  else
    skip_check "docker compose config -q" "no docker compose plugin here"
  fi
  run_check "docker/docker-compose.yml matches the compose-spec schema" check_compose_schema
  run_check "docker/docker-compose.yml references (build, env_file, depends_on, volumes)" check_compose_refs
  echo "== Dockerfile"
  run_check "docker/Dockerfile (+ .dockerignore) parses and follows the rules" check_dockerfile
  echo "== Postman"
  run_check "postman collection + environment load in postman-collection; scripts compile" check_collection
  run_check "newman loads the collection and environment" check_newman_loads
  echo "== Grafana dashboard and Prometheus alert rules (promtool)"
  ensure_promtool
  run_check "deploy/grafana/mailsender.json is valid JSON; queries use \${datasource}" check_dashboard_json
  run_check "every dashboard expression passes promtool check rules (as recording rules)" check_dashboard_exprs
  run_check "deploy/prometheus/mailsender-alerts.yaml passes promtool check rules --lint=all" check_alert_rules
  run_check "promtool test rules deploy/prometheus/mailsender-alerts.test.yaml" check_alert_tests
  run_check "every alert has a test where it fires and one where it must not" check_alert_tests_cover_every_alert
  if [[ $SKIPPED -gt 0 ]]; then
    echo "($SKIPPED check(s) skipped)"
  fi
  echo "$PASSED passed, $FAILED failed"
  [[ $FAILED -eq 0 ]]
}

# ---------------------------------------------------------------- live subcommands
cmd_newman() {
  local base="" token="" with_halt=0 positional=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --with-halt) with_halt=1 ;;
      -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  [[ ${#positional[@]} -ge 1 && ${#positional[@]} -le 2 ]] || die "usage: $0 newman BASE_URL [ADMIN_TOKEN] [--with-halt]"
  base="${positional[0]%/}"
  token="${positional[1]:-}"
  ensure_newman
  local folders=(--folder api)
  [[ $with_halt -eq 1 ]] && folders+=(--folder lifecycle)
  "$(newman_bin)" run "$COLLECTION" \
    -e "$ENVIRONMENT" \
    --env-var "baseUrl=$base" \
    --env-var "adminToken=$token" \
    "${folders[@]}" \
    --timeout-request 15000 \
    --reporters cli \
    --color off
}

cmd_promtool() {
  local raw=0 args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --raw) raw=1 ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  [[ ${#args[@]} -eq 1 ]] || die "usage: $0 promtool [--raw] FILE_OR_URL   (use - for stdin)"
  ensure_promtool
  local src="${args[0]}" tmp rc=0
  tmp="$(mktemp)"
  case "$src" in
    http://*|https://*)
      if command -v curl >/dev/null; then
        curl -fsS --max-time 15 "$src" >"$tmp"
      else
        python3 -c 'import sys,urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=15).read())' "$src" >"$tmp"
      fi ;;
    -) cat >"$tmp" ;;
    *) [[ -f "$src" ]] || die "no such file: $src"; cp "$src" "$tmp" ;;
  esac
  # mailsender's prometheus-client crate serves OpenMetrics text (ends with
  # "# EOF"; counter families named without _total; an "info" type), which
  # promtool's classic text-format parser rejects. Unless --raw is given,
  # translate it to the classic format first, so the lint is about the
  # metrics and not about the dialect.
  if [[ $raw -eq 0 ]] && grep -q '^# EOF' "$tmp"; then
    echo "input is OpenMetrics: translating to the classic text format for promtool (--raw to skip)"
    python3 - "$tmp" <<'PY'
import re, sys
path = sys.argv[1]
types, out = {}, []
lines = open(path, encoding="utf-8").read().splitlines()
for l in lines:
    m = re.match(r"# TYPE (\S+) (\S+)", l)
    if m:
        types[m.group(1)] = m.group(2)
def new_name(fam):
    t = types.get(fam)
    if t == "counter" and not fam.endswith("_total"):
        return fam + "_total", "counter"
    if t == "info":
        return fam + "_info", "gauge"
    if t == "stateset":
        return fam, "gauge"
    if t == "gaugehistogram":
        return fam, "histogram"
    if t == "unknown":
        return fam, "untyped"
    return fam, t
for l in lines:
    if l == "# EOF" or l.startswith("# UNIT "):
        continue
    m = re.match(r"# (HELP|TYPE) (\S+)(?: (.*))?$", l)
    if m:
        name, typ = new_name(m.group(2))
        out.append(f"# HELP {name} {m.group(3) or ''}".rstrip() if m.group(1) == "HELP" else f"# TYPE {name} {typ}")
        continue
    if l.startswith("#"):
        out.append(l); continue
    # drop exemplars and counter/histogram _created samples
    l = re.sub(r" # \{.*$", "", l)
    name = re.match(r"[^{ ]+", l).group(0) if l.strip() else ""
    if name.endswith("_created") and types.get(name[: -len("_created")]) in ("counter", "histogram", "summary"):
        continue
    out.append(l)
open(path, "w", encoding="utf-8").write("\n".join(out) + "\n")
PY
  fi
  local out
  out="$(promtool check metrics <"$tmp" 2>&1)" || rc=$?
  local families
  families="$(grep -c '^# TYPE ' "$tmp" || true)"
  rm -f "$tmp"
  if [[ $rc -eq 0 ]]; then
    echo "promtool check metrics: OK ($families metric families)"
  else
    echo "promtool check metrics: problems found (exit $rc, $families metric families):"
    printf '%s\n' "$out" | sed 's/^/  /'
  fi
  return $rc
}

main() {
  local cmd="${1:-static}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    static) static_checks ;;
    install) ensure_py_tools; ensure_newman; ensure_promtool ;;
    newman) cmd_newman "$@" ;;
    promtool) cmd_promtool "$@" ;;
    -h|--help|help) sed -n '2,26p' "$0" ;;
    *) die "unknown subcommand: $cmd (static|install|newman|promtool)" ;;
  esac
}

main "$@"
