#!/usr/bin/env bash
# Installs s3s-fs, a real S3-compatible server that keeps objects in a local folder, for the
# shard store's S3 test (store/tests/s3.rs), then prints how to start one by hand.
#
#   bash .ci/s3-server.sh     # idempotent: installs only if the pinned version is missing
#
# The test looks for `s3s-fs` on PATH and starts its own server on a free loopback port, with a
# temporary root and fixed test credentials, and stops it afterwards. Set
# SHARDSEAL_S3_TEST_ENDPOINT to point the test at a server you started yourself instead. With
# neither, the S3 tests print SKIPPED and pass, unless SHARDSEAL_S3_TEST_REQUIRED is set (CI should
# set it, so that a missing server fails the run instead of hiding).
# A cold install compiles about 170 crates. It is a debug build (`--debug`): the tests move a few
# megabytes, and the build takes about 2.5 min on 2 cores instead of about 6 for a release one.
set -euo pipefail

# 0.14.1 is the newest s3s-fs whose rust-version (1.92) our toolchain meets; 0.17 needs 1.96.
S3S_FS_VERSION="${S3S_FS_VERSION:-0.14.1}"
# Where to install: cargo's own bin dir (~/.cargo/bin, already on PATH) unless S3S_FS_ROOT
# names another install root, whose bin/ must then be put on PATH.
S3S_FS_ROOT="${S3S_FS_ROOT:-}"

bin_dir="${S3S_FS_ROOT:+$S3S_FS_ROOT/bin}"
bin_dir="${bin_dir:-${CARGO_HOME:-$HOME/.cargo}/bin}"
installed="$bin_dir/s3s-fs"

if [ -x "$installed" ] && "$installed" --version 2>/dev/null | grep -qx "s3s-fs $S3S_FS_VERSION"; then
    echo "s3s-fs $S3S_FS_VERSION already installed at $installed"
else
    echo "installing s3s-fs $S3S_FS_VERSION into $bin_dir (cargo install --debug --locked)"
    started=$(date +%s)
    root_args=()
    if [ -n "$S3S_FS_ROOT" ]; then root_args=(--root "$S3S_FS_ROOT"); fi
    cargo install --debug --locked s3s-fs --version "=$S3S_FS_VERSION" --features binary "${root_args[@]}"
    echo "installed s3s-fs $S3S_FS_VERSION in $(( $(date +%s) - started )) s"
fi

case ":$PATH:" in
    *":$bin_dir:"*) ;;
    *) echo "note: $bin_dir is not on PATH; the store's S3 test finds s3s-fs only on PATH" ;;
esac

cat <<USAGE

To start a server by hand (the bucket is a folder under the root):
  root=\$(mktemp -d) && mkdir "\$root/shardseal-test"
  $installed --host 127.0.0.1 --port 8014 \\
      --access-key shardseal-test --secret-key shardseal-test-secret "\$root"
and point the test at it:
  SHARDSEAL_S3_TEST_ENDPOINT=http://127.0.0.1:8014 cargo test -p shardseal-store --test s3
(bucket, region and credentials default to shardseal-test, us-east-1 and the keys above; override
with SHARDSEAL_S3_TEST_BUCKET, SHARDSEAL_S3_TEST_REGION, SHARDSEAL_S3_TEST_ACCESS_KEY_ID and
SHARDSEAL_S3_TEST_SECRET_ACCESS_KEY).
USAGE
