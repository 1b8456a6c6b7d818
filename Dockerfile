# Dialgate's image. The first stage builds the wheel and installs it, with
# its dependencies, into a virtual environment; the second copies that
# environment alone onto the same base and runs it as a user of its own.
#
#   docker build -t dialgate .
#   docker run -p 8000:8000 -v dialgate-data:/var/lib/dialgate \
#     -v "$PWD/my.toml:/etc/dialgate/dialgate.toml:ro" dialgate
#
# The base is any Debian-based image with python3 3.11 or later and its venv
# module; both stages must use the same one (the environment is copied).
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY dialects ./dialects
COPY storage ./storage
# pip is not needed to run: it is removed, the image has less in it.
RUN python3 -m venv /opt/dialgate \
 && /opt/dialgate/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels . \
 && /opt/dialgate/bin/pip install --no-cache-dir --disable-pip-version-check /wheels/dialgate-*.whl \
 && /opt/dialgate/bin/pip uninstall --yes --disable-pip-version-check pip \
 && /opt/dialgate/bin/dialgate --version

FROM ${PYTHON_IMAGE}
# A fixed numeric id, so a volume's owner and a `runAsNonRoot` check can
# name it; its home is the data directory.
RUN groupadd --system --gid 10001 dialgate \
 && useradd --system --uid 10001 --gid dialgate --home-dir /var/lib/dialgate --no-create-home \
        --shell /usr/sbin/nologin dialgate \
 && install -d -o dialgate -g dialgate -m 0750 /var/lib/dialgate
COPY --from=build /opt/dialgate /opt/dialgate
COPY deploy/dialgate.toml /etc/dialgate/dialgate.toml
ENV PATH=/opt/dialgate/bin:$PATH \
    DIALGATE_CONFIG=/etc/dialgate/dialgate.toml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/dialgate
VOLUME ["/var/lib/dialgate"]
USER 10001:10001
EXPOSE 8000
# /healthz through the Python already in the image (no curl in a slim base).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# SIGTERM drains in-flight requests (server.graceful_timeout, 10 s): give
# `docker stop` more than that, e.g. --time 20.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dialgate"]
CMD ["serve", "--config", "/etc/dialgate/dialgate.toml"]
