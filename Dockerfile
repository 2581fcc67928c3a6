# The worker image: vLLM's own CUDA image plus vqueue. Flower and the gateway run from it too.
FROM vllm/vllm-openai:v0.26.0
WORKDIR /app
COPY pyproject.toml README.md settings.toml ./
COPY producer producer
COPY worker worker
COPY devtools devtools
COPY gateway gateway
# vllm (and FastAPI/uvicorn) are already in the image; add vqueue with its gateway extra, ModelScope and Flower.
RUN pip install --no-cache-dir -e ".[gateway]" "modelscope>=1.20" "flower>=2.0"
ENTRYPOINT []
CMD ["celery", "-A", "worker", "worker"]
