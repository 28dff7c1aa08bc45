#!/usr/bin/env bash
# System programs the test suite needs besides the venv: a SLURM (slurmctld, slurmd, the client commands and munge)
# for tests/test_slurm.py, shellcheck for slurm/*.sh, and Chromium, which tests/test_evaluate.py opens evaluate.py's
# index.html in (headless). `make test` runs this before pytest. When every program is
# there it returns at once; otherwise, as root, it installs Debian's packages with apt-get (updating the package lists
# only if a first try fails). Without root or apt-get it names what is missing and exits 1.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge shellcheck chromium)
programs=(slurmctld slurmd sbatch srun scontrol squeue sinfo scancel munged shellcheck chromium)

missing_programs() {
  local name
  for name in "${programs[@]}"; do
    command -v "$name" > /dev/null || printf '%s ' "$name"
  done
}

missing=$(missing_programs)
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get > /dev/null; then
  echo "tools/setup_test_deps.sh: missing ${missing% }; install the Debian packages ${packages[*]}" \
    "(as root: apt-get install --no-install-recommends ${packages[*]})" >&2
  exit 1
fi
echo "tools/setup_test_deps.sh: installing ${packages[*]} for the tests (missing ${missing% })"
export DEBIAN_FRONTEND=noninteractive
install=(apt-get install -y -q --no-install-recommends "${packages[@]}")
"${install[@]}" > /dev/null || { apt-get update -q > /dev/null && "${install[@]}" > /dev/null; }
missing=$(missing_programs)
if [ -n "$missing" ]; then
  echo "tools/setup_test_deps.sh: still missing ${missing% } after apt-get install ${packages[*]}" >&2
  exit 1
fi
