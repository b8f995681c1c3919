#!/usr/bin/env bash
# Helm post-renderer: adds ear-sidecar to the tserver StatefulSet of a YugabyteDB chart release.
# Helm pipes the rendered chart into this script and installs what it prints; kustomize applies
# the ear-sidecar component (and what settings/kustomization.yaml adds) to it.
#
#   helm install yb yugabytedb/yugabyte -n yugabyte \
#     -f deploy/k8s/helm/values-ear-sidecar.yaml \
#     --post-renderer deploy/k8s/helm/post-render.sh
#
# Edit settings/kustomization.yaml first (CMK ARN, IAM role, images). Needs kubectl >= 1.27 (its
# built-in kustomize) or kustomize on PATH. Usage: post-render.sh [--help]  (manifests on stdin)
set -euo pipefail
case "${1:-}" in
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    "") ;;
    *) echo "post-render.sh: unexpected argument '$1' (rendered manifests come on stdin; see --help)" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
# kustomize refuses absolute paths to components: work in a private directory beside settings/.
tmp=$(mktemp -d "$here/.render.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/helm.yaml"
cp "$here/settings/volumeclaim-patch.yaml" "$tmp/"
[ -s "$tmp/helm.yaml" ] || { echo "post-render.sh: no manifests on stdin" >&2; exit 1; }
# The release namespace (the chart sets it on every object): the objects the component adds must
# be in it too, or kustomize cannot point the StatefulSet at the generated ConfigMaps' names.
ns=$(awk '/^kind: StatefulSet/ {s = 1} s && /^  namespace:/ {gsub(/"/, "", $2); print $2; exit}' "$tmp/helm.yaml")
[ -n "$ns" ] || { echo "post-render.sh: no StatefulSet with metadata.namespace in the rendered chart" >&2; exit 1; }
cat >"$tmp/kustomization.yaml" <<KUST
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: $ns
resources:
  - helm.yaml
components:
  - ../settings
patches:
  # After the components: appends the ear-data claim (its size is a parameter in that file).
  - path: volumeclaim-patch.yaml
    target:
      kind: StatefulSet
      name: "(.*-)?yb-tserver"
KUST
if command -v kustomize >/dev/null 2>&1; then
    kustomize build "$tmp"
else
    kubectl kustomize "$tmp"
fi
