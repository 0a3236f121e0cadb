# chattune on CUDA. Build:  docker build -t chattune .          (add --build-arg FLASH_ATTN=1 for flash-attention)
# Run:    docker run --gpus all --ipc=host -v $PWD/data:/data -v $PWD/output:/output chattune \
#           bash finetune/finetune_lora_single_gpu.sh -m Qwen/Qwen2.5-7B-Instruct -d /data/train.json -o /output/run
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG FLASH_ATTN=0
ARG FLASH_ATTN_VERSION=2.8.3.post2

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/chattune/.cache/huggingface

# Python, a compiler for DeepSpeed's JIT ops, and an MPI library for mpirun launches (mpi4py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git openmpi-bin libopenmpi-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 chattune

WORKDIR /opt/chattune

# torch first, from the CUDA index, so requirements.txt does not pull a different build.
# Then the Gated DeltaNet kernels (Qwen3.5/3.6/3.8, Qwen3-Next), built against that torch.
COPY requirements.txt requirements-cuda.txt ./
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install -r requirements.txt \
    && pip install --no-build-isolation -r requirements-cuda.txt \
    && if [ "${FLASH_ATTN}" = "1" ]; then pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; fi

COPY --chown=chattune:chattune . .
USER 1000
CMD ["python", "finetune.py", "--help"]
