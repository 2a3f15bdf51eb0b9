# ti2i on NVIDIA's Triton Inference Server container (GPU deployments).
# Build: docker build -t ti2i .
# Run:   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/engines:/engines ti2i
# The repository is generated from the mounted engine directory, then served by the container's own
# tritonserver; its python-backend models host the ONNX Runtime engines (CUDA execution provider with
# onnxruntime-gpu). A later change adds TensorRT plans for the container's native tensorrt_plan backend.
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
        imageio==2.38.1 imageio-ffmpeg==0.8.1 safetensors==0.8.0 "numpy<2"

EXPOSE 8000 8001 8002
CMD ["sh", "-c", "ti2i repository --engines /engines --out /tmp/model_repository && exec tritonserver --model-repository /tmp/model_repository --model-control-mode=none"]
