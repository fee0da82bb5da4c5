FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini celeryconfig.py ./
COPY sessions ./sessions
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir . flower
USER nobody
