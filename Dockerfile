# stickystate: one image for nodes and the router (`stickystate node` / `stickystate router`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir ".[server]" \
    && rm -rf /src/build /src/*.egg-info \
    && useradd --system --create-home --uid 10001 stickystate

USER stickystate
WORKDIR /home/stickystate

# 8100: router, 8101: node (set with STICKYSTATE_PORT / --port)
EXPOSE 8100 8101

CMD ["stickystate", "--help"]
