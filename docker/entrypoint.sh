#!/bin/sh
# The container runs `ti2i serve`, as a machine or a Kubernetes pod does: the container's own tritonserver
# (found on PATH), ti2i's HTTP guard on the published HTTP port (Triton's own on loopback), the supervisor,
# and the restricted APIs behind the key $TI2I_API_KEY (else a random one, printed at start).
# TI2I_BACKEND: the engines each family's core runs: tensorrt (default), aoti or ort. For tensorrt and aoti
# the first start builds the plans/packages for this GPU into the mounted engine directory (cached under a
# key of graph, compiler version, GPU and profile: later starts on the same GPU type load them).
# TI2I_ENGINES: one engine directory, or NAME=DIR pairs separated by spaces (one model family each).
# Arguments are passed on to `ti2i serve` (e.g. --methods sdedit,svd); its Triton log is $TI2I_LOG.
set -e
ENGINES=${TI2I_ENGINES:-/engines}
BACKEND=${TI2I_BACKEND:-tensorrt}
DEVICE=${TI2I_DEVICE:-cuda}
set -- --backend "$BACKEND" --device "$DEVICE" --repository "${TI2I_REPOSITORY:-/tmp/model_repository}" \
  --host 0.0.0.0 --http-port 8000 --grpc-port 8001 --metrics-port 8002 --log "${TI2I_LOG:-/tmp/tritonserver.log}" "$@"
for engines in $ENGINES; do
  case "$BACKEND" in tensorrt|aoti)
    echo "ti2i: building $BACKEND engines for this GPU in ${engines#*=} (first start only; minutes per UNet)"
    ti2i build --backend "$BACKEND" --engines "${engines#*=}" --device "$DEVICE" \
      ${TI2I_BUILD_LIMITS:+--limit "$TI2I_BUILD_LIMITS"} ;;
  esac
  set -- "$@" --engines "$engines"
done
exec ti2i serve "$@"
