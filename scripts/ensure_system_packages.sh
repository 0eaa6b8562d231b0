#!/usr/bin/env bash
# Installs the Debian packages that the deployment tests need, only when they are missing:
#   chromium    the browser test of the Dagster UI (Playwright drives /usr/bin/chromium; no browser download)
#   postgresql  the topology test (initdb/pg_ctl from /usr/lib/postgresql/<major>/bin)
# Idempotent: with both present it changes nothing and needs no network. `apt-get update` runs only when
# the package lists do not know a missing package (a fresh machine has no lists).
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
  || missing+=(postgresql)

if [ ${#missing[@]} -eq 0 ]; then
  echo "ensure_system_packages: chromium and postgresql present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure_system_packages: missing ${missing[*]}; run as root" \
       "(or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_system_packages: missing ${missing[*]} and no apt-get here; install them by hand" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
known=1
for package in "${missing[@]}"; do
  apt-cache show "$package" >/dev/null 2>&1 || known=0
done
if [ "$known" -eq 0 ]; then
  echo "ensure_system_packages: apt-get update"
  apt-get update -qq
fi
echo "ensure_system_packages: apt-get install ${missing[*]}"
apt-get install -y -qq "${missing[@]}" >/dev/null
echo "ensure_system_packages: installed ${missing[*]}"
