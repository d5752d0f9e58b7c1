#!/usr/bin/env bash
# The system packages the tests need, from Debian/Ubuntu apt: the C++ runtime build (tests/cpp) and a real
# browser for the web app's test (tests/app). Installs only what is missing; a failed install fails.
# Without apt-get (another OS), install them yourself; STDRC_ALLOW_SKIP_CPP=1 and STDRC_SKIP_BROWSER_TESTS=1
# let the tests skip those parts instead (docs/development.md).
for arg in "$@"; do  # --help: the comment above, on stdout
  case "$arg" in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;; esac
done
[ $# -eq 0 ] || { echo "error: system-packages.sh takes no arguments (it installs a fixed list): see --help" >&2; exit 2; }
set -euo pipefail
APT_PACKAGES=(
  nlohmann-json3-dev
  cmake
  g++
  chromium
)
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
  echo "error: no apt-get here to install ${APT_PACKAGES[*]}: install them yourself" >&2
  exit 1
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}"
fi
echo "system packages present: ${APT_PACKAGES[*]}"
