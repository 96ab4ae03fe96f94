# htc-lightning on a CUDA machine. The torch/torchvision wheels are CUDA builds; the constraints
# file pins them and every other dependency to the versions the tests ran with.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/htc-lightning
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml constraints.txt README.md ./
COPY htc_lightning ./htc_lightning
COPY configs ./configs
COPY cli.py ./
RUN pip install --upgrade pip && pip install -c constraints.txt .

ENTRYPOINT ["htc-lightning"]
CMD ["--help"]
