# One image for every Ablate role: the API (`ablate serve`), Ray head and workers, tuning.
# GPU workers get CUDA from torch's own wheels; the host needs the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 ABLATE_HOME=/var/lib/ablate
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ablate
# torch first: the largest layer, and it changes least often.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY ablations ablations
COPY workers workers
COPY orchestrator orchestrator
COPY dashboards dashboards
RUN pip install --no-cache-dir . optuna-dashboard

RUN useradd --create-home --uid 1000 ablate && mkdir -p /var/lib/ablate && chown ablate /var/lib/ablate
USER ablate
EXPOSE 8600
CMD ["ablate", "serve", "--host", "0.0.0.0", "--port", "8600"]
