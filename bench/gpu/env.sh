# Device side: source after bench/gpu/setup.sh (vLLM's environment, plus redis-server on PATH).
source .gpu/device-env.sh
export PATH=/tmp/redis/usr/bin:$PATH
export LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
