#!/usr/bin/env bash
# Install the Consul binary the tests and the demo use, without touching the
# system's apt configuration, and print its path on stdout.
#
# Order of preference:
#   1. `consul` already on PATH (any version; the tests are written for 1.8.7).
#   2. A cached copy from an earlier run: $MESHAGENT_CACHE/consul/usr/bin/consul.
#   3. The .deb named by $MESHAGENT_CONSUL_DEB (a local file; no network needed).
#   4. Debian 11 "bullseye" package `consul` (1.8.7), fetched with apt-get using a
#      private sources list and a private lists directory, then unpacked with dpkg -x.
#
# Environment:
#   MESHAGENT_CACHE       cache directory (default: ~/.cache/meshagent)
#   MESHAGENT_CONSUL_DEB  path to consul_1.8.7+dfsg1-2+b3_amd64.deb (optional)
#   MESHAGENT_DEBIAN_MIRROR  mirror URL (default: http://deb.debian.org/debian)
set -euo pipefail

if command -v consul >/dev/null 2>&1; then
    command -v consul
    exit 0
fi

cache="${MESHAGENT_CACHE:-$HOME/.cache/meshagent}"
root="$cache/consul"
bin="$root/usr/bin/consul"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi

mkdir -p "$root"
deb="${MESHAGENT_CONSUL_DEB:-}"
if [ -n "$deb" ] && [ ! -f "$deb" ]; then
    echo "install-consul: MESHAGENT_CONSUL_DEB=$deb does not exist; falling back to Debian's archive" >&2
    deb=""
fi

if [ -z "$deb" ]; then
    mirror="${MESHAGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    apt_dir="$cache/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/download"
    echo "deb $mirror bullseye main" > "$apt_dir/sources.list"
    apt_opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache::Archives=$apt_dir/archives"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "APT::Architecture=amd64"
        -o "Acquire::Languages=none"
    )
    echo "install-consul: fetching consul from Debian bullseye ($mirror)" >&2
    if ! apt-get -q "${apt_opts[@]}" update >&2; then
        echo "install-consul: apt-get update failed; set MESHAGENT_CONSUL_DEB to a local consul .deb" >&2
        exit 1
    fi
    (cd "$apt_dir/download" && rm -f consul_*.deb && apt-get -q "${apt_opts[@]}" download consul >&2)
    deb=$(ls "$apt_dir"/download/consul_*.deb | head -n 1)
fi

dpkg -x "$deb" "$root"
if [ ! -x "$bin" ]; then
    echo "install-consul: $deb did not contain usr/bin/consul" >&2
    exit 1
fi
echo "$bin"
