# Root filesystem of the securevol managed plugin.
#
# scripts/build-plugin.sh --from dockerfile builds this image, exports its
# filesystem into the plugin directory next to config.json, and runs
# `docker plugin create`. The image itself is never run as a container.
#
# Build arguments:
#   REGISTRY     registry prefix with a trailing slash, e.g. "registry.example.com/"
#                or "" for an image that is already present in the local daemon
#   BASE_IMAGE   Debian image to build on; its python3 must match in both stages
ARG REGISTRY=docker.io/
ARG BASE_IMAGE=library/debian:bookworm-slim

# Stage 1: compile pyfuse3 against libfuse3 and install securevol into a venv.
FROM ${REGISTRY}${BASE_IMAGE} AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc pkg-config libfuse3-dev \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY plugin /src/plugin
RUN python3 -m venv /opt/securevol \
    && /opt/securevol/bin/pip install --no-cache-dir --disable-pip-version-check "/src[transit]"

# Stage 2: the runtime. fuse3 brings libfuse3 and fusermount3, which the
# daemon uses to unmount a volume's FUSE filesystem.
FROM ${REGISTRY}${BASE_IMAGE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 fuse3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Same path in both stages, because a venv's scripts name its interpreter by absolute path.
COPY --from=build /opt/securevol /opt/securevol

# config.json sets the real entrypoint and environment of the plugin; this one
# only documents the image when it is inspected on its own.
ENTRYPOINT ["/opt/securevol/bin/securevol", "serve"]
