#!/usr/bin/env bash
# `make test` runs this first: the OS packages of the real services the test suite starts (PostgreSQL's server,
# headless Chromium for the dashboard's browser test), installed with apt-get where they are missing and this user
# can (root). Where they cannot be installed, it says so
# in one line and the tests that need them skip, each naming its package.
set -uo pipefail
missing=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing the OS packages the tests' services need: ${missing[*]}"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    exit 0
  fi
  echo "could not install ${missing[*]} with apt-get: the tests that need them skip"
else
  echo "not installing ${missing[*]} (that needs root and apt-get): the tests that need them skip"
fi
exit 0
