FROM python:3.11-slim
# The image installs the package as a wheel would, with the worker's extra (worker, beat,
# `sessions db upgrade`) and Flower: only `sessions` lands on sys.path, so the commands are
# `celery -A sessions.worker ...` (docker-compose.yml); the checkout's `workers/` and
# `celeryconfig.py` are not copied.
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY sessions ./sessions
RUN pip install --no-cache-dir '.[worker]' flower
USER nobody
