#!/usr/bin/env bash
# Fetch real-data Debian packages (no installation, no root needed when apt lists exist) and unpack
# them under DEST/root. Used by `make test` (Fashion-MNIST) and by the benchmark corpus (wallpaper
# photographs).
# Usage: bench/fetch_debian_data.sh DEST PACKAGE...
set -euo pipefail
dest=$1; shift
mkdir -p "$dest/debs" "$dest/root"
cd "$dest/debs"
for pkg in "$@"; do
  if [ -f "../root/.$pkg" ]; then continue; fi
  if ! ls "${pkg}"_*.deb >/dev/null 2>&1; then
    apt-get download "$pkg" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get download "$pkg" >/dev/null; } || {
      echo "error: could not download the Debian package $pkg (apt-get download)" >&2; exit 1; }
  fi
  dpkg-deb -x "${pkg}"_*.deb ../root
  touch "../root/.$pkg"
  echo "fetched $pkg into $dest/root" >&2
done
