#!/bin/sh
# First start on a GPU: build the TensorRT plans for this GPU into the mounted engine directory (cached
# under a key of graph, TensorRT version, GPU and profile: later starts on the same GPU type load them),
# then serve them natively (tensorrt_plan models, python tokenizer and pre/post steps, ensembles).
# TI2I_BACKEND=onnxruntime serves the ONNX graphs on onnxruntime_onnx instead; python: python-backend models.
set -e
ENGINES=${TI2I_ENGINES:-/engines}
BACKEND=${TI2I_BACKEND:-tensorrt}
REPOSITORY=${TI2I_REPOSITORY:-/tmp/model_repository}
if [ "$BACKEND" = "tensorrt" ]; then
  echo "ti2i: building TensorRT plans for this GPU in $ENGINES/tensorrt (first start only; minutes per UNet)"
  ti2i build --backend tensorrt --engines "$ENGINES" ${TI2I_BUILD_LIMITS:+--limit "$TI2I_BUILD_LIMITS"}
fi
ti2i repository --engines "$ENGINES" --backend "$BACKEND" --out "$REPOSITORY"
# Restricted APIs (shared memory, repository, logging, trace, statistics) need the key: $TI2I_API_KEY, else a
# random one printed here. The published HTTP port is served by ti2i's HTTP guard (body limit; the
# form-encoded bodies that crash this Triton's HTTP frontend are defused), Triton's own on loopback.
KEY=${TI2I_API_KEY:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')}
[ -n "$TI2I_API_KEY" ] || echo "ti2i: restricted-API key (header ti2i-api-key): $KEY"
RESTRICTED=shared-memory,model-repository,logging,trace,statistics
python3 -m ti2i.triton_models.http_guard --listen 0.0.0.0:8000 --upstream 127.0.0.1:8010 &
exec tritonserver --model-repository "$REPOSITORY" --model-control-mode=none --strict-readiness=true \
  --http-address=127.0.0.1 --http-port=8010 \
  --http-restricted-api="$RESTRICTED:ti2i-api-key=$KEY" --grpc-restricted-protocol="$RESTRICTED:ti2i-api-key=$KEY" "$@"
