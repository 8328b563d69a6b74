# Runner image for the CLIP model adapter on Dataloop (referenced by dataloop.json's runnerImage).
#
# Dataloop's agent image brings Python, CUDA and the agent; the adapter's code itself is
# fetched from the codebase at service start, so this image holds only dependencies and
# the default model's weights (downloaded at build time, so a service starts offline).
#
#   docker build -t <registry>/clip-model-adapter:0.1.0 .
#   docker build --build-arg PREFETCH_MODELS="ViT-B/32 ViT-L/14" -t ... .
ARG BASE_IMAGE=dataloopai/dtlpy-agent:gpu.cuda.11.8.py3.10.pytorch2
FROM ${BASE_IMAGE}

# Weights live in a fixed, world-readable cache so the agent's user (1000) finds them.
USER root
ENV HF_HOME=/opt/clip-cache/huggingface \
    XDG_CACHE_HOME=/opt/clip-cache \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
RUN mkdir -p /opt/clip-cache /opt/clip-adapter && chown -R 1000:1000 /opt/clip-cache /opt/clip-adapter

USER 1000
WORKDIR /opt/clip-adapter

# Dependencies first, so code changes do not invalidate this layer. The base image's torch
# satisfies the range in requirements.txt and is kept as it is.
COPY --chown=1000:1000 requirements.txt .
RUN python3 -m pip install --user --upgrade pip \
 && python3 -m pip install --user -r requirements.txt

# Download the default model's weights into the cache at build time.
ARG PREFETCH_MODELS="ViT-B/32"
COPY --chown=1000:1000 adapters/ adapters/
RUN python3 -m adapters.clip download ${PREFETCH_MODELS} \
 && python3 -m adapters.clip models
