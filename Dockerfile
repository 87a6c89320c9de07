# The dirtylog build environment: Debian 12 with the armhf cross-compiler and the project's Python
# dependencies. No registry is needed: the base image is made locally with debootstrap
# (`python -m builder.baseimage`, called by scripts/setup-docker.sh). builder/runtime.py builds this
# image from a context of exactly the files copied below and tags it by their hash.
#
#   docker build -t dirtylog-builder .                      # uses dirtylog-base:bookworm
#   docker build --build-arg APT_MIRROR=http://.../debian .  # other Debian mirror for apt
ARG BASE_IMAGE=dirtylog-base:bookworm
FROM ${BASE_IMAGE}

# Optional: rewrite the image's apt sources to this mirror (default: the one debootstrap used).
ARG APT_MIRROR=
ARG BUILDER_UID=1000
ARG BUILDER_GID=1000
# The Python dependencies come from Debian (signed by the archive, fetched over the same mirror),
# so building the image needs no PyPI. WITH_PYPI=1 installs the project's full dependency set with
# pip instead (adds qemu.qmp, which only `dirtylog verify` needs), from PIP_INDEX_URL if given.
ARG WITH_PYPI=
ARG PIP_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8 TZ=UTC \
    PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# The Debian packages scripts/setup-host.sh installs for `dirtylog build --arch armv7|aarch64|x86_64`
# (not QEMU, not the test-only tools); git for the manifest's commit of the mounted checkout.
# Second group: `dirtylog build --engine buildroot` runs Buildroot in this image. What Buildroot's
# support/dependencies/dependencies.sh checks for (which: debianutils, essential; cmp: diffutils;
# awk: mawk; perl's modules are in perl-modules), plus the Debian tools that an offline lab's
# host-package stand-ins exec instead of building them (bison flex m4 kmod patchelf fakeroot pkgconf;
# see README "Building from source with Buildroot").
RUN set -eu; \
    if [ -n "$APT_MIRROR" ]; then \
        rm -f /etc/apt/sources.list.d/*; \
        echo "deb $APT_MIRROR bookworm main" > /etc/apt/sources.list; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        gcc libc6-dev make \
        python3 python3-venv \
        gpgv debian-archive-keyring ca-certificates \
        cpio xz-utils git \
        ninja-build pkg-config patch meson libglib2.0-dev zlib1g-dev libfdt-dev \
        python3-click python3-pyelftools python3-debian python3-requests python3-tqdm \
        python3-setuptools python3-wheel \
        sed binutils g++ bash gzip bzip2 perl tar unzip rsync file bc findutils wget \
        bison flex m4 kmod patchelf fakeroot pkgconf; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    git config --system --add safe.directory '*'

RUN groupadd --gid "$BUILDER_GID" builder \
    && useradd --uid "$BUILDER_UID" --gid "$BUILDER_GID" --create-home --shell /bin/bash builder

# The project, installed editable into a venv (the builder finds dirtyram-src/ next to builder/).
# README.md is only pyproject's long description: an empty one keeps doc edits from rebuilding.
COPY pyproject.toml /opt/dirtylog/
COPY builder/ /opt/dirtylog/builder/
COPY verifier/ /opt/dirtylog/verifier/
COPY dirtylog/ /opt/dirtylog/dirtylog/
COPY dirtyram-src/ /opt/dirtylog/dirtyram-src/
RUN set -eu; \
    touch /opt/dirtylog/README.md; \
    python3 -m venv --system-site-packages /opt/venv; \
    if [ -n "$PIP_INDEX_URL" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi; \
    if [ -n "$WITH_PYPI" ]; then \
        /opt/venv/bin/pip install --quiet -e /opt/dirtylog; \
    else \
        /opt/venv/bin/pip install --quiet --no-deps --no-build-isolation --no-index -e /opt/dirtylog; \
    fi; \
    /opt/venv/bin/python -c "import builder.build, builder.lock, dirtylog.cli"; \
    /opt/venv/bin/dirtylog build --help >/dev/null; \
    chown -R builder:builder /opt/dirtylog

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DIRTYLOG_CACHE=/cache
USER builder
WORKDIR /home/builder
ENTRYPOINT ["dirtylog"]
CMD ["--help"]
