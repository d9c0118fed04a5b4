# EarlyCroP pipeline on NVIDIA GPUs: PyTorch + CUDA 12 base, this project, DeepSpeed.
#
#   docker build -t earlycrop .
#   docker run --gpus all --shm-size 16g -v $PWD/runs:/workspace/earlycrop/runs earlycrop
#   docker run --gpus all --shm-size 16g earlycrop run configs/quickstart.yaml train.max_steps=100
#   docker run --gpus all --shm-size 16g --entrypoint accelerate earlycrop \
#       launch --config_file launch/accelerate/zero2.yaml -m launch.cli run configs/quickstart.yaml
#
# The base image must carry torch 2.13.0 (pyproject pins torch==2.13.0; a local version such as
# 2.13.0+cu128 satisfies it). With another torch, pip would download a second multi-GB torch.
# "-runtime" has no nvcc: enough for DDP and ZeRO with torch's optimizers; use the matching
# "-devel" tag if you enable DeepSpeed ops that compile at first use (FusedAdam, CPU offload Adam).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_EXTENSIONS_DIR=/workspace/.torch_extensions \
    HF_HOME=/workspace/.hf

WORKDIR /workspace/earlycrop

# DeepSpeed ships as an sdist whose setup.py imports torch: build it against the torch already in
# the image (no build isolation, so pip does not fetch another torch into a build environment).
RUN pip install "setuptools>=68" wheel packaging ninja \
 && DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"

COPY . .
RUN pip install ".[deepspeed]" \
 && python -c "import torch, earlycrop, pipeline, launch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Runs and the embedded MLflow store (sqlite:///<output_dir>/mlflow.db) go under runs/: mount it.
# Set MLFLOW_TRACKING_URI (e.g. -e MLFLOW_TRACKING_URI=http://mlflow:5000) to use a server.
VOLUME ["/workspace/earlycrop/runs"]

# One node, 8 GPUs, DDP, bf16. Arguments after the image name replace CMD (the `launch.cli` args).
ENTRYPOINT ["accelerate", "launch", "--config_file", "launch/accelerate/gpu_8_ddp.yaml", "-m", "launch.cli"]
CMD ["run", "configs/quickstart.yaml"]
