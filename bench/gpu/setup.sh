#!/usr/bin/env bash
# Device side (the lent GPU machine; no network): after the vLLM bundle's chunks are gathered
# in /tmp/stage (see bench/README.md), unpack vLLM and build the Qwen2-VL-2B-shaped dummy model
# (the shared recipe's .gpu/device-setup.sh), then add what vqueue needs on top of the image:
# the serve wheels (.stage/extra), vqueue's own dependencies (.whl) and redis-server (.deb).
set -euo pipefail
bash .gpu/device-setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .stage/extra/*.whl .whl/*.whl
mkdir -p /tmp/redis && for f in .deb/*.deb; do dpkg -x "$f" /tmp/redis; done
PATH=/tmp/redis/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu redis-server --version
