# The Nimbus portal image: daphne (bounded request bodies, portal/serve.py) serving the Django project
# (HTTP + the IDE's WebSockets).
# Build from the repository root:  docker build -t registry.example.com/nimbus/portal:0.1.0 .
# Runtime images for functions are separate: functions/runtimes/<runtime>/Dockerfile.

# Front-end assets (Bootstrap, htmx, icons, Monaco) come from npm, as in development.
FROM node:20-bookworm-slim AS assets
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=portal.settings \
    NIMBUS_DATA_DIR=/var/lib/nimbus \
    STATIC_ROOT=/app/staticfiles
RUN useradd --system --uid 10001 --user-group --home-dir /app nimbus \
    && mkdir -p /var/lib/nimbus && chown nimbus:nimbus /var/lib/nimbus
WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN mkdir -p portal tenancy functions webide observability \
    && pip install --no-compile . \
    && pip uninstall --yes nimbus
COPY manage.py ./
COPY portal/ portal/
COPY tenancy/ tenancy/
COPY functions/ functions/
COPY webide/ webide/
COPY observability/ observability/
COPY templates/ templates/
COPY static/ static/
COPY --from=assets /src/node_modules/ node_modules/

# Static files are collected at build time (the manifest storage needs them); the key only
# exists for this one command.
RUN SECRET_KEY=build-only-not-secret python manage.py nimbus_assets \
    && SECRET_KEY=build-only-not-secret python manage.py collectstatic --noinput \
    && rm -rf node_modules

USER 10001
EXPOSE 8000
CMD ["python", "-m", "portal.serve", "-b", "0.0.0.0", "-p", "8000", "--proxy-headers", "portal.asgi:application"]
