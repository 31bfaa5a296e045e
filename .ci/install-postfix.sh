#!/usr/bin/env bash
# Installs Postfix as the benchmark baseline relay (see shared/bench/postfix-relay.md).
#
# Not run by CI: only `petrel-bench --postfix` needs it. Idempotent: re-running
# re-applies the same configuration. Postfix is configured as a loopback-only
# relay (127.0.0.1:2525 -> smarthost [127.0.0.1]:2526) and is NOT left running;
# petrel-bench points `relayhost` at its own sink and starts/stops it.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-postfix.sh: run as root" >&2
  exit 1
fi

if ! command -v postfix >/dev/null 2>&1 || ! command -v smtp-source >/dev/null 2>&1; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postfix >/dev/null
fi

# Debian ships no main.cf with "No configuration": write ours (whole file, so
# re-runs converge). Every destination is relayed to the sink; nothing is
# delivered locally; only loopback may connect.
cat > /etc/postfix/main.cf <<'CONF'
compatibility_level = 3.6
myhostname = relay.test
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:2526
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = /var/log/postfix.log
default_process_limit = 100
smtp_destination_concurrency_limit = 20
CONF

# The smtp service listens on 127.0.0.1:2525 only, never on :25.
if postconf -M smtp/inet 2>/dev/null | grep -q .; then
  postconf -MX smtp/inet
fi
if [ -z "$(postconf -M 127.0.0.1:2525/inet 2>/dev/null)" ]; then
  postconf -M '127.0.0.1:2525/inet=127.0.0.1:2525 inet n - n - - smtpd'
fi
# No chroot: the chroot would need copies of /etc files and libraries.
postconf -F '*/*/chroot = n'

postfix check
# Leave it stopped: the bench starts it with the sink it chooses.
postfix stop >/dev/null 2>&1 || true
echo "postfix $(postconf -h mail_version) configured as loopback relay on 127.0.0.1:2525"
