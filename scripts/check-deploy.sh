#!/usr/bin/env bash
# Checks the deployment files where this machine can: the YAML parses (compose and Kubernetes), the
# compose file has the services and health checks it promises, the Dockerfile keeps its promises
# (non-root, HEALTHCHECK on /readyz), and systemd-analyze accepts the unit when systemd is there.
# Usage: scripts/check-deploy.sh [python]   (a python3 with PyYAML; default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
"$py" - <<'PY'
import yaml
compose = yaml.safe_load(open("deploy/docker-compose.yml"))
services = compose["services"]
assert {"postgres", "migrate", "jobhook-1", "jobhook-2"} <= set(services), sorted(services)
assert all(services[s]["environment"]["JOBHOOK_DATABASE_URL"].startswith("postgres://") for s in ("jobhook-1", "jobhook-2"))
docs = list(yaml.safe_load_all(open("deploy/kubernetes/jobhook.yaml")))
kinds = sorted(d["kind"] for d in docs if d)
containers = [c for d in docs if d and d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]]
assert containers and containers[0]["readinessProbe"]["httpGet"]["path"] == "/readyz", "k8s: readiness on /readyz"
pods = [d["spec"]["template"]["spec"] for d in docs if d and d["kind"] == "Deployment"]
images = [c for p in pods for c in p["containers"] + p.get("initContainers", [])]
# A locally built :latest image is pulled from a registry (and not found) unless told otherwise.
assert all(c.get("imagePullPolicy") == "IfNotPresent" for c in images if c["image"].endswith(":latest")), "k8s: imagePullPolicy"
print(f"deploy: compose services {sorted(compose['services'])}; kubernetes {kinds}")
PY
grep -q '^USER jobhook' deploy/Dockerfile
# The unit's documented install steps make the directory of its environment file before the file.
grep -q '^#   install -d .*/etc/jobhook$' deploy/jobhook.service
# The image's own config file is valid (checked by the binary, with no JOBHOOK_* variable around).
if [ -x target/debug/jobhook ]; then
  settings=$(env -u JOBHOOK_CONFIG -u JOBHOOK_LISTEN -u JOBHOOK_DATABASE_URL target/debug/jobhook config check \
    --config deploy/jobhook.container.toml)
  grep -q '^listen = "0.0.0.0:8080"  # file$' <<<"$settings" || { echo "$settings"; exit 1; }
  echo "deploy: the image's config file is valid"
fi
grep -q '^HEALTHCHECK .*/readyz' deploy/Dockerfile
if command -v systemd-analyze >/dev/null && [ -x target/debug/jobhook ]; then
  # The unit names /usr/local/bin/jobhook; verify against a copy of it in a temporary root.
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  sed "s#/usr/local/bin/jobhook#$PWD/target/debug/jobhook#" deploy/jobhook.service >"$tmp/jobhook.service"
  systemd-analyze verify "$tmp/jobhook.service"
  echo "deploy: systemd-analyze verify passed"
else
  echo "deploy: systemd-analyze not here; unit not verified"
fi
echo "deploy: ok"
