#!/usr/bin/env bash
# Regenerates the official-parity fixtures under tests/fixtures/ (tools/official_parity/README.md).
#   bash tools/official_parity/make_fixtures.sh            # every case
#   bash tools/official_parity/make_fixtures.sh losses     # some cases
# Each case runs its `--stage inputs` with the project's python, then its `--stage official` with
# the official CPU python. Environment: PROJECT_PYTHON (default .venv/bin/python), OFFICIAL_PYTHON
# (default /tmp/official/python), OFFICIAL_MFVIS_SRC (default /tmp/official/src/mfvis), WORKDIR
# (scratch folder, default a new temporary one), FIXTURES_OUT (default tests/fixtures).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ALL_CASES=(losses state_dict model_forward train_step inference criterion transforms swin)
if [ $# -gt 0 ]; then cases=("$@"); else cases=("${ALL_CASES[@]}"); fi
project_python=${PROJECT_PYTHON:-.venv/bin/python}
official_python=${OFFICIAL_PYTHON:-/tmp/official/python}
workdir=${WORKDIR:-$(mktemp -d)}
out=${FIXTURES_OUT:-tests/fixtures}
for case in "${cases[@]}"; do
  if [ ! -f "tools/official_parity/$case.py" ]; then
    echo "make_fixtures.sh: no case '$case' (tools/official_parity/$case.py)" >&2
    exit 2
  fi
  echo "== $case" >&2
  "$project_python" -m "tools.official_parity.$case" --stage inputs --workdir "$workdir/$case" \
    --out "$out"
  "$official_python" -m "tools.official_parity.$case" --stage official --workdir "$workdir/$case" \
    --out "$out"
done
