#!/usr/bin/env bash
# Install the test peers (Debian packages) and the Python environment, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-gdcm postgresql iproute2 util-linux curl chromium pixelmed-apps rsyslog rsyslog-gnutls logrotate"
missing=""
for p in $PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
