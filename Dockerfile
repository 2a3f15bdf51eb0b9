# ti2i on NVIDIA's Triton Inference Server container (GPU deployments).
# Build: docker build -t ti2i .
# Run:   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/engines:/engines ti2i
# The engine directory comes from `ti2i export --precision fp16` (any machine). The entrypoint runs
# `ti2i serve` with the container's own tritonserver (on PATH: its backends, no nvidia-pytriton needed),
# the HTTP guard on port 8000, the supervisor and the restricted APIs. On first start it builds TensorRT
# plans for the GPU it runs on into /engines/tensorrt (with progress; cached under graph, TensorRT
# version, GPU and profile, so later starts load them) and the engine core runs them.
# TI2I_BACKEND=aoti or ort instead; TI2I_ENGINES="sd15=/engines/sd15 svd=/engines/svd" for several families;
# TI2I_BUILD_LIMITS=batch=8,height=96,width=96 caps the plans' profiles (their memory grows with the max).
# 24.10 ships TensorRT 10.5: the pinned `tensorrt-cu12==10.5.0` builds plans its TensorRT runtime loads.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/ti2i
COPY pyproject.toml constraints.txt README.md ./
COPY ti2i ti2i
COPY export export
COPY engines engines
COPY triton_models triton_models
COPY client client
COPY benchmarks benchmarks
COPY examples examples

# The container brings its own tritonserver; the pinned CPU torch wheel is replaced by the CUDA build.
RUN python3 -m pip install --no-cache-dir --upgrade pip \
 && python3 -m pip install --no-cache-dir torch==2.13.0 \
 && python3 -m pip install --no-cache-dir -c constraints.txt --no-deps . \
 && python3 -m pip install --no-cache-dir diffusers==0.42.1 transformers==5.23.0 onnx==1.23.2 \
        onnxruntime-gpu==1.31.1 "tritonclient[grpc,http]==2.73.0" pillow==13.0.0 tqdm==4.70.1 \
        imageio==2.38.1 imageio-ffmpeg==0.8.1 safetensors==0.8.0 "numpy<2" tensorrt-cu12==10.5.0 pytest==9.2.0
COPY gpu_check gpu_check
COPY Makefile ./
COPY docker/entrypoint.sh /usr/local/bin/ti2i-entrypoint

EXPOSE 8000 8001 8002
# `docker run --gpus all --entrypoint make ti2i gpu-check` runs the GPU checks in the container instead.
ENTRYPOINT ["/usr/local/bin/ti2i-entrypoint"]
