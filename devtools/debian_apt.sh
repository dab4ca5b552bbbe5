# Shared by devtools/fetch_backends.sh and devtools/otelcol/build.sh (source it, do not run it):
# a private apt state for one Debian suite, on the mirror this machine already uses, so that packages
# can be downloaded and unpacked without root and without touching the system's apt.

# Print the mirror of this machine's Debian sources (never a hard-coded host): the URIs of the deb822
# entry whose Suites name the release this machine runs (this skips the -security entry, which lives on
# another archive), or the one-line format's equivalent. DEBIAN_MIRROR overrides.
debian_mirror() {
  local release mirror="${DEBIAN_MIRROR:-}"
  release="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")"
  if [[ -z "${mirror}" && -n "${release}" && -r /etc/apt/sources.list.d/debian.sources ]]; then
    mirror="$(awk -v release="${release}" '
      BEGIN { RS = ""; FS = "\n" }          # one record per deb822 paragraph
      {
        uris = ""; hit = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)   { uris = $i; sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); uris = u[1] }
          if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == release) hit = 1 }
        }
        if (hit && uris != "") { print uris; exit }
      }' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [[ -z "${mirror}" && -n "${release}" && -r /etc/apt/sources.list ]]; then
    # One-line format: "deb [opts] URI <release> main".
    mirror="$(awk -v release="${release}" \
      '$1 == "deb" { for (i = 2; i < NF; i++) if ($(i+1) == release) { print $i; exit } }' /etc/apt/sources.list)"
  fi
  if [[ -z "${mirror}" ]]; then
    echo "error: cannot find this machine's Debian mirror in /etc/apt; set DEBIAN_MIRROR=http://.../debian" >&2
    return 1
  fi
  echo "${mirror}"
}

# Set up a private apt state for SUITE in DIR and fill the array `apt_opts` with the options that make
# apt-get/apt-cache use it (and nothing of the system's sources).
#   private_apt DIR SUITE MIRROR
private_apt() {
  local dir="$1" suite="$2" mirror="$3" keyring="/usr/share/keyrings/debian-archive-keyring.gpg"
  [[ -r "${keyring}" ]] || { echo "error: ${keyring} missing (apt-get install debian-archive-keyring)" >&2; return 1; }
  mkdir -p "${dir}/lists/partial" "${dir}/cache/archives/partial" "${dir}/sources.list.d"
  # The installed keyring package carries the keys of the newer suites too, so signature checking stays on.
  echo "deb [signed-by=${keyring}] ${mirror} ${suite} main" > "${dir}/sources.list"
  apt_opts=(
    -o "Dir::State::Lists=${dir}/lists"
    -o "Dir::State::status=${dir}/status"                 # empty: nothing counts as installed
    -o "Dir::Cache=${dir}/cache"
    -o "Dir::Etc::SourceList=${dir}/sources.list"
    -o "Dir::Etc::SourceParts=${dir}/sources.list.d"     # empty: ignore system sources
    -o "Acquire::Check-Valid-Until=false"                # snapshot mirrors have expired Release files
    # As root apt drops to _apt for downloads, which cannot write into our folder;
    # run as the invoking user instead (a no-op for non-root users).
    -o "APT::Sandbox::User=$(id -un)"
    -q
  )
  touch "${dir}/status"
}
