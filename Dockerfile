# dermnode, CPU image. Build: docker build -t dermnode .
# Run:   docker run -p 11112:11112 -v dermnode-var:/var/lib/dermnode \
#          -e DERMNODE_DESTINATION__HOST=pacs.example.org dermnode
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DERMNODE_STORAGE__DIR=/var/lib/dermnode \
    DERMNODE_MODEL__PATH=/opt/dermnode/models/derm-effnetlite0-ham7 \
    DERMNODE_MODEL__DEVICE=cpu

WORKDIR /opt/dermnode
# The same torch/torchvision pair the project is tested with (this wheel also runs on
# CUDA hosts; see README "Docker" for a smaller CPU-only build and the CUDA variant).
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY node ./node
COPY models ./models
COPY config ./config
RUN pip install . && useradd --system --uid 10001 --home /var/lib/dermnode dermnode \
    && mkdir -p /var/lib/dermnode && chown dermnode /var/lib/dermnode

USER dermnode
VOLUME ["/var/lib/dermnode"]
EXPOSE 11112
# C-ECHO against itself.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s CMD ["dermnode", "echo", "--self"]
# exec form: dermnode runs as PID 1 and receives SIGTERM directly;
# it stops accepting associations, finishes the jobs in hand and leaves the rest journaled.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dermnode"]
CMD ["serve", "--config", "/opt/dermnode/config/node.toml"]
