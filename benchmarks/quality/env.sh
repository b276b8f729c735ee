# env.sh: sourced by passkey.sh and books.sh: where the repo, the Python and the infinitrain CLI are.
HERE="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# PY: the README's set-up venv ($ROOT/.venv), else python on PATH
PY="${PY:-$ROOT/.venv/bin/python}"; [ -x "$PY" ] || PY=python
INF="$(dirname "$(command -v "$PY")")/infinitrain"; [ -x "$INF" ] || INF=infinitrain
export OMP_NUM_THREADS="${THREADS:-1}"
