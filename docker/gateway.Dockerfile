# API gateway for the face-fusion service: Debian's nginx (the same package the tests run), nothing else.
# Its config is rendered on the host (`python -m gateway.render`, see README "Gateway") and mounted read-only:
# it holds the API keys and Triton's admin secret, so it is never baked into the image.
FROM debian:12.8-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/*

EXPOSE 8000 8001
STOPSIGNAL SIGQUIT
# The rendered config says `daemon off;`, logs to stdout/stderr and runs its workers as www-data.
CMD ["nginx", "-c", "/etc/facefuse/nginx.conf"]
