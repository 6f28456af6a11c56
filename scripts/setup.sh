#!/usr/bin/env bash
# Installs everything opacityd needs on a fresh Debian machine: the DICOM peers
# used by tests (DCMTK, dicom3tools, Orthanc, PostgreSQL 15, systemd tools, chromium for the page tests) and a venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends dcmtk dicom3tools orthanc postgresql chromium systemd python3-venv >/dev/null
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
