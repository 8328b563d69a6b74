# Runner image for the CLIP model app: dataloop.json's runnerImage, tagged with the app version
# (scripts/release.py builds and pushes it). The adapter's code itself is fetched from the
# codebase (gitTag) when a service starts, so this image holds the dependencies and the weights
# of the models named in PREFETCH_MODELS, so a service starts without network.
#
# Dataloop's runner-image guidance (README of github.com/dataloop-ai/dtlpy-runner-images):
# - no fixed USER: the base images give every user the same access;
# - install with ${DL_PYTHON_EXECUTABLE} -m pip (set in every base image), not a bare pip;
# - leave HOME alone (the base images set HOME=/tmp with the right permissions).
# The agent brings its own dtlpy and its pins (the GPU base images keep PyJWT<=1.7.1, dtlpy 1.126
# wants PyJWT>=2.12 and attrs<25): this image never installs dtlpy over it.
#
#   docker build -t IMAGE:VERSION .
#   docker build --build-arg PREFETCH_MODELS="ViT-B/32 ViT-L/14 RN50" -t IMAGE:VERSION .
ARG BASE_IMAGE=hub.dataloop.ai/dtlpy-runner-images/gpu:python3.10_cuda11.8_pytorch2
FROM ${BASE_IMAGE}

# One cache outside HOME for every model's weights, readable by whichever user the agent runs as.
ENV HF_HOME=/opt/clip-cache/huggingface \
    CLIP_ADAPTER_ENGINES=/opt/clip-cache/engines \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/clip-adapter

# Dependencies first, so code changes do not invalidate this layer. Everything in requirements.txt
# except dtlpy; the base image's torch satisfies the range there and is kept as it is.
COPY requirements.txt .
RUN grep -viE '^[[:space:]]*dtlpy([^A-Za-z0-9_.-]|$)' requirements.txt > requirements-image.txt \
 && ${DL_PYTHON_EXECUTABLE} -m pip install --no-cache-dir -r requirements-image.txt

# Weights of any model `python -m adapters.clip models` lists (or ARCH:TAG), downloaded at build time.
ARG PREFETCH_MODELS="ViT-B/32"
COPY adapters/ adapters/
# Their ONNX exports too (engine `auto`, docs/benchmarks.md): a pod's first load then only times the
# engines on its own CPU instead of exporting (158 s for ViT-B/32 on the loaded 2-core machine of docs/benchmarks.md).
# The exports are read-only to the service user (a non-root one cannot damage them; every process checks
# their hashes before use anyway, docs/robustness.md); auto's choice for a pod's CPU, which the build could
# not measure, is then kept in memory per process, and new exports go to the user's cache.
RUN ${DL_PYTHON_EXECUTABLE} -m adapters.clip download ${PREFETCH_MODELS} \
 && for model in ${PREFETCH_MODELS}; do \
      ${DL_PYTHON_EXECUTABLE} -m adapters.clip embed --text warmup --model "$model" --engine auto --out /tmp/warmup || exit 1; \
    done \
 && rm -f /tmp/warmup.npy /tmp/warmup.jsonl \
 && ${DL_PYTHON_EXECUTABLE} -m adapters.clip models \
 && chmod -R a+rwX /opt/clip-cache/huggingface \
 && chmod -R a+rX,go-w /opt/clip-cache/engines
