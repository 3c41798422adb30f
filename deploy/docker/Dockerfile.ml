# The ML TenSafe image: trainer, he and inference (torch 2.13.0 CPU, transformers, peft, opacus, tenseal). It holds
# the whole `tensafe` distribution, so it serves the light services too.
#   podman build --build-arg BASE=localhost/tensafe-base:bookworm -f deploy/docker/Dockerfile.ml build/image-context
# The build context is what scripts/build_images.sh prepares: wheels/ (a wheelhouse: the build needs no network),
# local-wheels/ (this repository's two distributions), requirements-light.txt, requirements-ml.txt and
# tensafe-health. BASE: any Debian bookworm with python3 (3.11) and python3-venv.
ARG BASE=localhost/tensafe-base:bookworm

FROM ${BASE} AS build
# torch first and pinned: the range `tensafe` declares is then met by the CPU build in the wheelhouse. Then the
# third-party requirements the two wheels declare (requirements-ml.txt, written by scripts/build_images.sh), and
# last this repository's wheels with --no-deps: editing the code rebuilds only that small layer.
COPY requirements-light.txt requirements-ml.txt /tmp/
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/tensafe \
    && /opt/tensafe/bin/pip install --no-cache-dir --no-index --find-links /wheels torch==2.13.0 \
    && /opt/tensafe/bin/pip install --no-cache-dir --no-index --find-links /wheels \
         -r /tmp/requirements-light.txt -r /tmp/requirements-ml.txt
COPY local-wheels /tmp/local-wheels
RUN /opt/tensafe/bin/pip install --no-cache-dir --no-index --no-deps /tmp/local-wheels/*.whl \
    && /opt/tensafe/bin/pip check \
    && /opt/tensafe/bin/pip uninstall -y -q pip \
    && rm -rf /opt/tensafe/lib/python3.11/site-packages/setuptools \
    && find /opt/tensafe/lib/python3.11/site-packages -depth -type d -name tests \
         -path '*/site-packages/[ns][uc][mi]py/*' -exec rm -rf {} +

FROM ${BASE}
RUN useradd --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin tensafe \
    && mkdir -p /data /secrets /models && chown 10001:10001 /data /secrets && chmod 0700 /data /secrets
COPY --from=build /opt/tensafe /opt/tensafe
COPY tensafe-health /usr/local/bin/tensafe-health
# Writable paths: /data (a volume) and /tmp; base models are read from /models (mount them read-only).
# No hub downloads at run time: model names resolve in TENSAFE_MODEL_DIR / TENSAFE_MODELS only.
ENV PATH=/opt/tensafe/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    TENSAFE_DATA_DIR=/data \
    TENSAFE_MODEL_DIR=/models \
    TENSAFE_HOST=0.0.0.0 \
    TENSAFE_PORT=50051 \
    TENSAFE_METRICS_PORT=9090
USER 10001:10001
# No VOLUME instruction: a container that mounts nothing at /data would get an anonymous volume that outlives
# it (compose services that keep nothing there). Mount a volume at /data where a service writes (SQLite, blobs).
WORKDIR /data
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["tensafe-health"]
ENTRYPOINT ["tensafe", "serve"]
CMD ["trainer"]
