#!/usr/bin/env bash
# Fetch the real observability backends (Prometheus, promtool, VictoriaMetrics)
# from Debian 13 (trixie) packages into .cache/backends/ of this repo, without
# Docker and without installing anything system-wide:
#   .cache/backends/apt   private apt state (lists, cache, sources)
#   .cache/backends/debs  downloaded .deb files
#   .cache/backends/root  `dpkg -x` of every .deb (binaries in root/usr/bin)
# Idempotent: exits at once when the binaries are already there.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${repo_root}/.cache/backends"
bin="${cache}/root/usr/bin"
suite="trixie"
# promtool is its own package in Debian (prometheus only Depends on it).
packages=(prometheus promtool victoria-metrics)

print_versions() {
  "${bin}/prometheus" --version 2>&1 | head -n 1
  "${bin}/promtool" --version 2>&1 | head -n 1
  # Debian builds VictoriaMetrics without the version ldflags, so -version may
  # print an empty line; fall back to the version of the .deb it came from.
  local vm_version
  vm_version="$("${bin}/victoria-metrics" -version 2>&1 | tr -d '[:space:]' || true)"
  if [[ -z "${vm_version}" ]]; then
    vm_version="$(cat "${cache}/root/VERSION.victoria-metrics" 2>/dev/null || echo unknown)"
  fi
  echo "victoria-metrics, version ${vm_version}"
}

if [[ -x "${bin}/prometheus" && -x "${bin}/promtool" && -x "${bin}/victoria-metrics" ]]; then
  echo "backends already present in ${bin}"
  exit 0
fi

# shellcheck source=devtools/debian_apt.sh
source "${repo_root}/devtools/debian_apt.sh"
mirror="$(debian_mirror)"
echo "mirror: ${mirror} (suite ${suite})"
mkdir -p "${cache}/debs"
# Keep the whole cache out of git even before the repo .gitignore mentions it.
[[ -e "${cache}/.gitignore" ]] || echo '*' > "${cache}/.gitignore"
private_apt "${cache}/apt" "${suite}" "${mirror}"

apt-get "${apt_opts[@]}" update
(cd "${cache}/debs" && apt-get "${apt_opts[@]}" download "${packages[@]}")

# Extract into a scratch folder and move it into place at the end, so an
# interrupted run never leaves a half-populated root that looks complete.
rm -rf "${cache}/root.partial"
mkdir -p "${cache}/root.partial"
for pkg in "${packages[@]}"; do
  deb="$(ls -t "${cache}/debs/${pkg}"_*.deb | head -n 1)"
  dpkg -x "${deb}" "${cache}/root.partial"
  dpkg-deb -f "${deb}" Version > "${cache}/root.partial/VERSION.${pkg}"
done
rm -rf "${cache}/root"
mv "${cache}/root.partial" "${cache}/root"

# These are trixie builds; make sure they run on this (older) system.
print_versions
