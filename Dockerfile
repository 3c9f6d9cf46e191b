# syntax=docker/dockerfile:1
#
# llama-agent images, one target per service (BuildKit builds only the stages a target needs):
#
#   docker build --target loader    -t llama-agent/loader:0.1.0    .
#   docker build --target generator -t llama-agent/generator:0.1.0 .
#   docker build --target embedder  -t llama-agent/embedder:0.1.0  .
#
# GPU images of the generator and the embedder (the loader never needs CUDA):
#
#   docker build --target generator --build-arg CUDA=1 -t llama-agent/generator:0.1.0-cuda .
#
# llama.cpp ships as the dist layout (scripts/dist.sh): /opt/llama-agent/bin holds the binary,
# llama.cpp's shared libraries and one CPU module per x86 generation (x64 ... zen4,
# sapphirerapids); the best one this machine can run is loaded at start, so one image runs on
# every x86-64 server. The CUDA image adds libggml-cuda.so, built with nvcc from the same
# llama.cpp source, beside them (CUDA_ARCHITECTURES picks the GPU generations). Embedder images
# for Hopper GPUs: --build-arg CUDA_FORCE_CUBLAS=1 (cuBLAS instead of llama.cpp's int8 kernels
# for quantized weights; 1.2x on an H200, BENCHMARKS.md); docker-compose.cuda.yml sets it.
#
# Runtime images run as uid/gid 10001, carry the service binary and `llama-health` (gRPC
# health probe, used by HEALTHCHECK), and take every setting from the environment (README,
# "Configuration"). The loader keeps its cache in /models: mount the model volume there, and at
# the same path (read-only) in the generator and the embedder, which open the paths it returns.

ARG CUDA=0
ARG RUST_VERSION=1.95
ARG CUDA_VERSION=12.6.3
ARG CUDA_UBUNTU=ubuntu22.04
ARG CUDA_ARCHITECTURES="80;86;89;90"
ARG CUDA_FORCE_CUBLAS=0

# ---------------------------------------------------------------------------------------------
# Toolchains: builder-0 (CPU) and builder-1 (CUDA: nvcc from NVIDIA's devel image, Rust by rustup).

FROM rust:${RUST_VERSION}-bookworm AS builder-0
# Debian's cmake and libclang (bindgen) for llama.cpp; the distribution's versions (not pinned).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libclang-dev \
 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU} AS builder-1
ARG RUST_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential ca-certificates cmake curl git libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH} \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}"

# ---------------------------------------------------------------------------------------------
# Builds. The workspace sources only (no target/, models/, .venv/: see .dockerignore), so that
# editing docs or deployment files does not rebuild llama.cpp.

# The loader has no llama.cpp; its hashes pick SIMD at run time.
FROM builder-0 AS build-loader
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY services services
COPY client client
COPY tests tests
# llama-health is built on its own (`--bin` alone finds it in whichever workspace crate has it).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=llama-agent-target-cpu,target=/src/target,sharing=locked \
    cargo build --release --locked -p llama-loader --bin llama-loader \
 && cargo build --release --locked --bin llama-health \
 && mkdir -p /out \
 && for bin in llama-loader llama-health; do \
        objcopy --strip-debug "target/release/$bin" "/out/$bin"; \
    done

# The generator and the embedder share one build (and one llama.cpp compilation): the dist
# folder, then (CUDA=1) the CUDA module from the llama.cpp source llama-cpp-sys-2 vendors.
# (DL3006: builder-${CUDA} is a stage of this file, not an image to tag.)
# hadolint ignore=DL3006
FROM builder-${CUDA} AS build-inference
ARG CUDA
ARG CUDA_ARCHITECTURES
ARG CUDA_FORCE_CUBLAS
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY llama.cpp-patches llama.cpp-patches
COPY proto proto
COPY services services
COPY client client
COPY tests tests
COPY scripts/dist.sh scripts/dist.sh
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=llama-agent-target-inference,target=/src/target,sharing=locked \
    scripts/dist.sh /out/llama-agent >/dev/null \
 && if [ "${CUDA}" = 1 ]; then \
        src="$(echo /usr/local/cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp)" \
     && cmake -S "$src" -B /tmp/cuda -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
            -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_CUDA=ON \
            -DGGML_CUDA_FORCE_CUBLAS="$([ "${CUDA_FORCE_CUBLAS}" = 1 ] && echo ON || echo OFF)" \
            -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF \
     && cmake --build /tmp/cuda -j "$(nproc)" --target ggml-cuda \
     && cp /tmp/cuda/bin/libggml-cuda.so /out/llama-agent/bin/; \
    fi

# ---------------------------------------------------------------------------------------------
# Runtime bases: runtime-0 (Debian slim) and runtime-1 (CUDA runtime libraries: cuBLAS...; the
# driver comes from the host through the NVIDIA container toolkit). Same set-up on both:
# CA certificates (hub downloads over TLS), libgomp1 (llama.cpp's OpenMP), libstdc++6, and the
# unprivileged user owning /models (a fresh named volume mounted there inherits that owner).

FROM debian:bookworm-slim AS runtime-0
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 llama \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin llama \
 && install -d -o 10001 -g 10001 -m 0755 /models

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU} AS runtime-1
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libgomp1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 llama \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin llama \
 && install -d -o 10001 -g 10001 -m 0755 /models

# ---------------------------------------------------------------------------------------------
# Service images.

FROM runtime-0 AS loader
LABEL org.opencontainers.image.title="llama-loader" \
      org.opencontainers.image.description="llama-agent loader: owns the GGUF model volume" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build-loader /out/llama-loader /out/llama-health /usr/local/bin/
ENV LLAMA_LOADER_LISTEN=0.0.0.0:50051 \
    LLAMA_CACHE_DIR=/models \
    LLAMA_AGENT_METRICS_LISTEN=0.0.0.0:9090 \
    OTEL_SERVICE_NAME=llama-loader
USER 10001:10001
WORKDIR /models
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/llama-health", "--endpoint", "http://127.0.0.1:50051"]
ENTRYPOINT ["/usr/local/bin/llama-loader"]

# Pre-warmed loader (docs/deploy.md, "Pre-warming the model cache"): the models are downloaded
# at build time into /models, so a pod, or a fresh named volume mounted on /models (Docker copies
# the image's files into an empty one), starts with them on disk. llama-cli's in-process loader
# writes the cache layout llama-loader reads. --network host (or --add-host) reaches a mirror on
# the build host:
#
#   docker build --target loader-prewarmed \
#     --build-arg PREWARM_MODELS="unsloth/gemma-3-270m-it-GGUF:Q4_K_M" \
#     -t llama-agent/loader:0.1.0-prewarmed .
FROM runtime-0 AS prewarm
ARG PREWARM_MODELS=""
ARG HF_ENDPOINT=https://huggingface.co
COPY --from=build-inference /out/llama-agent /opt/llama-agent
ENV LLAMA_CACHE_DIR=/models
USER 10001:10001
RUN if [ -z "${PREWARM_MODELS}" ]; then \
        echo "set --build-arg PREWARM_MODELS='owner/repo[:QUANT] ...'" >&2; exit 1; \
    fi \
 && for model in ${PREWARM_MODELS}; do \
        HF_ENDPOINT="${HF_ENDPOINT}" /opt/llama-agent/bin/llama-cli pull "$model" || exit 1; \
    done

FROM loader AS loader-prewarmed
COPY --from=prewarm --chown=10001:10001 /models /models

# Generator and embedder: SERVING only once their preloads (LLAMA_*_PRELOAD) are loaded, which
# may include a download: a long start period. (DL3006: runtime-${CUDA} is a stage above.)
# hadolint ignore=DL3006
FROM runtime-${CUDA} AS generator
LABEL org.opencontainers.image.title="llama-generator" \
      org.opencontainers.image.description="llama-agent generator: streams tokens from GGUF models" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build-inference /out/llama-agent /opt/llama-agent
COPY --from=build-inference /out/llama-agent/bin/llama-health /usr/local/bin/
ENV LLAMA_GENERATOR_LISTEN=0.0.0.0:50052 \
    LLAMA_AGENT_METRICS_LISTEN=0.0.0.0:9090 \
    OTEL_SERVICE_NAME=llama-generator
USER 10001:10001
EXPOSE 50052 8080 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/usr/local/bin/llama-health", "--endpoint", "http://127.0.0.1:50052"]
ENTRYPOINT ["/opt/llama-agent/bin/llama-generator"]

# hadolint ignore=DL3006
FROM runtime-${CUDA} AS embedder
LABEL org.opencontainers.image.title="llama-embedder" \
      org.opencontainers.image.description="llama-agent embedder: embeds texts with GGUF models" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build-inference /out/llama-agent /opt/llama-agent
COPY --from=build-inference /out/llama-agent/bin/llama-health /usr/local/bin/
ENV LLAMA_EMBEDDER_LISTEN=0.0.0.0:50053 \
    LLAMA_AGENT_METRICS_LISTEN=0.0.0.0:9090 \
    OTEL_SERVICE_NAME=llama-embedder
USER 10001:10001
EXPOSE 50053 8080 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/usr/local/bin/llama-health", "--endpoint", "http://127.0.0.1:50053"]
ENTRYPOINT ["/opt/llama-agent/bin/llama-embedder"]
