#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:6379 (install redis-server from Debian if missing).
set -euo pipefail
ping() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server missing: installing it with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
mkdir -p /tmp/uniguard-redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp/uniguard-redis --logfile /tmp/uniguard-redis/redis.log
for _ in $(seq 1 50); do ping && exit 0; sleep 0.1; done
echo "Redis did not start on 127.0.0.1:6379 (see /tmp/uniguard-redis/redis.log)" >&2
exit 1
