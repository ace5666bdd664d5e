#!/usr/bin/env bash
# Debian packages the test suite needs: a real sshd for the device tests, qemu and Debian's archive
# keyring for the emulated Raspberry Pi, a headless Chromium (and its driver) that opens report.html,
# a PostgreSQL server that the search tests start (initdb in a temporary directory) for a shared study.
# Installs only what is missing; needs root (or passwordless sudo).
set -euo pipefail
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
