#!/usr/bin/env bash
# buf breaking against main's previous protos:
#  - on a branch other than main: against main;
#  - on main with uncommitted proto changes: against HEAD;
#  - on main, clean: against HEAD~1 (the change that just landed).
# Without a previous revision that has protos (first commit, shallow clone) there is
# nothing to compare against, and it says so.
set -euo pipefail
BUF=${BUF:-node_modules/.bin/buf}
branch=$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo "")
if [[ -n "${BUF_BREAKING_AGAINST:-}" ]]; then
  ref=$BUF_BREAKING_AGAINST
elif [[ "$branch" != "main" ]] && git rev-parse -q --verify main >/dev/null; then
  ref=main
elif ! git diff --quiet HEAD -- protos buf.yaml 2>/dev/null; then
  ref=HEAD
else
  ref=HEAD~1
fi
if ! git rev-parse -q --verify "$ref^{commit}" >/dev/null || ! git cat-file -e "$ref:buf.yaml" 2>/dev/null; then
  echo "buf breaking: no earlier revision ($ref) with protos to compare against; nothing to check"
  exit 0
fi
echo "buf breaking: protos against $ref"
"$BUF" breaking --against ".git#ref=$(git rev-parse "$ref")"
