#!/usr/bin/env bash
# Builds MinkowskiEngine 0.5.4 (CPU only) into the active Python environment, for
# `--backend minkowski`. Needs torch installed first (`pip install -e .`); takes about 3 minutes
# on 2 cores. Installs Debian's libopenblas-dev first when it is missing (with sudo unless
# root). For a CUDA build see the README, section "Backends".
set -euo pipefail

if python -c "import fcmae.sites.minkowski" 2>/dev/null; then
    echo "MinkowskiEngine is already installed."
    exit 0
fi
if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq libopenblas-dev
fi
pip install ninja numpy
# --no-build-isolation: it compiles against this environment's torch; --no-cache-dir: a wheel
# cached from another torch would not load.
pip install minkowskiengine==0.5.4 --no-build-isolation --no-deps --no-cache-dir \
    -C--global-option=--blas=openblas -C--global-option=--cpu_only
python -c "import fcmae.sites.minkowski; print('MinkowskiEngine works.')"
