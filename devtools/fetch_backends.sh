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
keyring="/usr/share/keyrings/debian-archive-keyring.gpg"

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

# Use the same mirror this machine already uses (never hard-code a host): the
# URIs of the deb822 entry whose Suites contain exactly "bookworm" (this skips
# the -security entry, which lives on another archive). DEBIAN_MIRROR overrides.
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "${mirror}" && -r /etc/apt/sources.list.d/debian.sources ]]; then
  mirror="$(awk '
    BEGIN { RS = ""; FS = "\n" }          # one record per deb822 paragraph
    {
      uris = ""; hit = 0
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^URIs:/)   { uris = $i; sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); uris = u[1] }
        if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == "bookworm") hit = 1 }
      }
      if (hit && uris != "") { print uris; exit }
    }' /etc/apt/sources.list.d/debian.sources)"
fi
if [[ -z "${mirror}" && -r /etc/apt/sources.list ]]; then
  # One-line format fallback: "deb [opts] URI bookworm main".
  mirror="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($(i+1) == "bookworm") { print $i; exit } }' \
    /etc/apt/sources.list)"
fi
if [[ -z "${mirror}" ]]; then
  echo "error: cannot find the Debian bookworm mirror in /etc/apt; set DEBIAN_MIRROR=http://.../debian" >&2
  exit 1
fi
[[ -r "${keyring}" ]] || { echo "error: ${keyring} missing (apt-get install debian-archive-keyring)" >&2; exit 1; }
echo "mirror: ${mirror} (suite ${suite})"

apt_dir="${cache}/apt"
mkdir -p "${apt_dir}/lists/partial" "${apt_dir}/cache/archives/partial" "${apt_dir}/sources.list.d" "${cache}/debs"
# Keep the whole cache out of git even before the repo .gitignore mentions it.
[[ -e "${cache}/.gitignore" ]] || echo '*' > "${cache}/.gitignore"
# The bookworm keyring package already carries the trixie archive keys, so
# signature checking stays on.
echo "deb [signed-by=${keyring}] ${mirror} ${suite} main" > "${apt_dir}/sources.list"

apt_opts=(
  -o "Dir::State::Lists=${apt_dir}/lists"
  -o "Dir::Cache=${apt_dir}/cache"
  -o "Dir::Etc::SourceList=${apt_dir}/sources.list"
  -o "Dir::Etc::SourceParts=${apt_dir}/sources.list.d"   # empty: ignore system sources
  -o "Acquire::Check-Valid-Until=false"                  # snapshot mirrors have expired Release files
  # As root apt drops to _apt for downloads, which cannot write into our folder;
  # run as the invoking user instead (a no-op for non-root users).
  -o "APT::Sandbox::User=$(id -un)"
  -q
)

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
