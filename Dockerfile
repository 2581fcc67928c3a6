# The worker image: vLLM's own CUDA image plus vqueue. Flower runs from it too.
FROM vllm/vllm-openai:v0.26.0
WORKDIR /app
COPY pyproject.toml README.md settings.toml ./
COPY producer producer
COPY worker worker
COPY devtools devtools
# vllm is already in the image; add vqueue, ModelScope and Flower.
RUN pip install --no-cache-dir -e . "modelscope>=1.20" "flower>=2.0"
ENTRYPOINT []
CMD ["celery", "-A", "worker", "worker"]
