#!/usr/bin/env bash
# Build an OpenTelemetry Collector (core components: otlp receiver, memory_limiter and batch processors,
# debug, otlp and otlp_http exporters, env and file config providers) from Debian's Go source packages,
# offline in GOPATH mode, into .cache/otelcol/ of this repo. No Docker, nothing installed system-wide,
# no Go module proxy: every line of source comes from the Debian archive.
#   .cache/otelcol/otelcol             the binary
#   .cache/otelcol/otelcol.built-from  what it was built from: main.go's hash, the suite, and every Debian
#                                      package whose files went into it, with its version
#   .cache/otelcol/apt/<suite>         private apt state (lists, cache)
#   .cache/otelcol/work                scratch (debs, unpacked tree, Go build cache), deleted after a build
# Reuses the binary while the packages it was built from have the same versions in their suite (and
# devtools/otelcol/main.go is unchanged); without a network it reuses it unchecked, with a warning.
# Tries Debian sid first, then forky (testing, an older Collector) when sid cannot build;
# OTELCOL_DEBIAN_SUITES="forky" picks the suites.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${repo_root}/.cache/otelcol"
binary="${cache}/otelcol"
record="${cache}/otelcol.built-from"
main_go="${repo_root}/devtools/otelcol/main.go"
suites=(${OTELCOL_DEBIAN_SUITES:-sid forky})
# The Go toolchain (golang-go: the suite's default Go) and the Collector's core, with every Go library
# they depend on. Only golang-* packages: with CGO off no C library goes in.
roots=(golang-go golang-opentelemetry-collector-dev)
# shellcheck source=devtools/debian_apt.sh
source "${repo_root}/devtools/debian_apt.sh"

mkdir -p "${cache}"
# Keep the whole cache out of git even before the repo .gitignore mentions it.
[[ -e "${cache}/.gitignore" ]] || echo '*' > "${cache}/.gitignore"
main_sum="$(sha256sum "${main_go}" | cut -d' ' -f1)"

# "package version" lines, sorted, of the named packages' candidates in the current private apt state.
candidate_versions() {
  apt-cache "${apt_opts[@]}" show --no-all-versions "$@" 2>/dev/null \
    | awk '/^Package:/ { p = $2 } /^Version:/ { print p, $2 }' | sort -u
}

describe() {
  local suite collector go_version
  suite="$(awk '$1 == "suite" { print $2 }' "${record}")"
  collector="$(awk '$1 == "package" && $2 == "golang-opentelemetry-collector-dev" { print $3 }' "${record}")"
  go_version="$(awk '$1 == "go" { print $2 }' "${record}")"
  echo "$1: $("${binary}" --version) (golang-opentelemetry-collector-dev ${collector}, Debian ${suite}," \
    "${go_version}, $(awk '$1 == "package"' "${record}" | wc -l) packages) in ${binary}"
}

# Exit status 0 when the binary on disk is what a build now would produce.
up_to_date() {
  [[ -x "${binary}" && -r "${record}" ]] || return 1
  [[ "$(awk '$1 == "main.go" { print $2 }' "${record}")" == "${main_sum}" ]] || return 1
  local suite mirror
  suite="$(awk '$1 == "suite" { print $2 }' "${record}")"
  if ! mirror="$(debian_mirror)" || ! private_apt "${cache}/apt/${suite}" "${suite}" "${mirror}" \
      || ! apt-get "${apt_opts[@]}" update >/dev/null 2>&1; then
    echo "warning: cannot reach the Debian mirror; reusing the collector without checking its packages" >&2
    return 0
  fi
  local -a built_from
  mapfile -t built_from < <(awk '$1 == "package" { print $2 }' "${record}")
  [[ "$(candidate_versions "${built_from[@]}")" == "$(awk '$1 == "package" { print $2, $3 }' "${record}" | sort)" ]]
}

# Unpack the .deb $1 into the tree $2 and write "DIR<TAB>PACKAGE VERSION" for every directory in which
# it has a file into $1.owners (a file per .deb: parallel writers into one pipe would interleave lines).
unpack() {
  local owner
  owner="$(dpkg-deb -f "$1" Package) $(dpkg-deb -f "$1" Version)"
  dpkg-deb -X "$1" "$2" | awk -v owner="${owner}" \
    '!/\/$/ { path = $0; sub(/^\./, "", path); sub(/\/[^\/]*$/, "", path); print path "\t" owner }' > "$1.owners"
}

# Build from one suite into ${cache}/work; on success move the binary and its record into place.
build_from() {
  local suite="$1" mirror work root
  mirror="$(debian_mirror)"
  work="${cache}/work"
  root="${work}/root"
  rm -rf "${work}"
  mkdir -p "${work}/debs" "${root}"
  private_apt "${cache}/apt/${suite}" "${suite}" "${mirror}"
  echo "collector: Debian ${suite} from ${mirror}"
  apt-get "${apt_opts[@]}" update >/dev/null

  local -a packages
  mapfile -t packages < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
      --no-conflicts --no-breaks --no-replaces --no-enhances "${roots[@]}" | grep '^golang-' | sort -u)
  echo "collector: downloading ${#packages[@]} packages (the Go toolchain and the Collector's dependency closure)"
  local started=${SECONDS}
  (cd "${work}/debs" && apt-get "${apt_opts[@]}" download "${packages[@]}" >/dev/null)
  export -f unpack
  printf '%s\n' "${work}"/debs/*.deb | xargs -P "$(nproc)" -I{} bash -c 'unpack "$1" "$2"' _ {} "${root}"
  sort -u "${work}"/debs/*.owners > "${work}/owners"
  echo "collector: downloaded and unpacked in $((SECONDS - started)) s"

  export GOROOT="${root}/usr/lib/go" GOPATH="${root}/usr/share/gocode" GOCACHE="${work}/gocache"
  # GOPATH mode, nothing from the network, a static binary that runs on any Linux of this architecture.
  export GO111MODULE=off GOPROXY=off GOTOOLCHAIN=local GOTELEMETRY=off GOFLAGS= CGO_ENABLED=0
  local go="${GOROOT}/bin/go" version
  version="$(dpkg-deb -f "${work}"/debs/golang-opentelemetry-collector-dev_*.deb Version)"
  version="${version#*:}"
  version="${version%-*}"   # upstream version: no epoch, no Debian revision
  echo "collector: building otelcol ${version} with $("${go}" version) (a few minutes on 2 cores)"
  started=${SECONDS}
  (cd "${work}" && "${go}" build -trimpath -ldflags "-s -w -X main.version=${version}" -o "${work}/otelcol" "${main_go}")
  echo "collector: built in $((SECONDS - started)) s"
  "${work}/otelcol" --version >/dev/null

  # The packages whose files went into the binary: those owning a directory of a compiled Go package
  # (the standard library's included) or the compiler itself. Their versions are the cache key.
  local -a dirs
  mapfile -t dirs < <(cd "${work}" && "${go}" list -deps -f '{{.Dir}}' "${main_go}" \
    | sed '/^$/d' | xargs realpath | sed "s|^${root}||")
  dirs+=("$(realpath "$("${go}" env GOTOOLDIR)" | sed "s|^${root}||")")
  printf '%s\n' "${dirs[@]}" | sort -u > "${work}/dirs"
  {
    echo "# Built by devtools/otelcol/build.sh; rebuilt when any of this changes."
    echo "main.go ${main_sum}"
    echo "suite ${suite}"
    echo "go $("${go}" env GOVERSION)"
    awk -F'\t' 'NR == FNR { used[$1] = 1; next } ($1 in used) { print "package " $2 }' \
      "${work}/dirs" "${work}/owners" | sort -u
  } > "${work}/built-from"
  mv "${work}/otelcol" "${binary}"
  mv "${work}/built-from" "${record}"
  rm -rf "${work}"
}

# A child process does one suite's build, so that `set -e` applies inside it (it would not inside a
# function called as an `if` condition) and a failure leaves this process free to try the next suite.
if [[ -n "${OTELCOL_BUILD_SUITE:-}" ]]; then
  build_from "${OTELCOL_BUILD_SUITE}"
  exit 0
fi

if up_to_date; then
  describe "collector up to date"
  exit 0
fi
for suite in "${suites[@]}"; do
  if OTELCOL_BUILD_SUITE="${suite}" bash "${BASH_SOURCE[0]}"; then
    describe "collector built"
    exit 0
  fi
  rm -rf "${cache}/work"
  echo "warning: the collector does not build from Debian ${suite}" >&2
done
echo "error: no Debian suite of (${suites[*]}) builds the collector; see the messages above" >&2
exit 1
