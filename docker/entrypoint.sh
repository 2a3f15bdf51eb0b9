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
exec tritonserver --model-repository "$REPOSITORY" --model-control-mode=none "$@"
