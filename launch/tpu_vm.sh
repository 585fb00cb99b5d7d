#!/usr/bin/env bash
# Trains on a Cloud TPU VM or pod slice: create it, set up every worker, run on all, tear down.
#
#   launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --accelerator v5litepod-16 \
#       --workdir gs://BUCKET/run1 [--project P] [--version RUNTIME] [--spot] \
#       [--steps create,setup,run,delete] -- --config experiments/pod_gemma3_1b.py:prefinetune
#
# Steps (default: create,setup,run,delete):
#   create  gcloud compute tpus tpu-vm create (the accelerator type names the slice, e.g.
#           v5litepod-16 = 16 v5e chips on 4 hosts).
#   setup   copy this checkout to every worker and install it with the tpu extra and the
#           pinned constraints (--worker=all).
#   run     `python -m embedder.train --distributed --workdir WORKDIR <args>` on all workers at
#           once; jax.distributed finds its peers from the TPU metadata by itself.
#   delete  tear the VM down (also runs on failure of `run` when `delete` was asked for).
# --dry-run prints every command instead of running it. The workdir should be on GCS so that
# every host writes its checkpoint shards to one place and the results outlive the VM.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""
ACCELERATOR=""
VERSION=""
WORKDIR=""
SPOT=0
STEPS="create,setup,run,delete"
REMOTE_DIR="embedder"
TRAIN_ARGS=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --name) NAME="$2"; shift 2 ;;
        --zone) ZONE="$2"; shift 2 ;;
        --project) PROJECT="$2"; shift 2 ;;
        --accelerator) ACCELERATOR="$2"; shift 2 ;;
        --version) VERSION="$2"; shift 2 ;;
        --workdir) WORKDIR="$2"; shift 2 ;;
        --spot) SPOT=1; shift ;;
        --steps) STEPS="$2"; shift 2 ;;
        --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; TRAIN_ARGS=("$@"); break ;;
        *) echo "tpu_vm.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
[[ -n "$NAME" ]] || die "--name is required (the TPU VM name)"
[[ -n "$ZONE" ]] || die "--zone is required, e.g. --zone us-west4-a"
[[ -n "$ACCELERATOR" ]] || die "--accelerator is required, e.g. --accelerator v5litepod-16"

# The runtime image that matches each TPU generation (override with --version).
if [[ -z "$VERSION" ]]; then
    case "$ACCELERATOR" in
        v4-*) VERSION="tpu-ubuntu2204-base" ;;
        v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
        v5p-*) VERSION="v2-alpha-tpuv5" ;;
        v6e-*) VERSION="v2-alpha-tpuv6e" ;;
        *) die "no default runtime for accelerator '$ACCELERATOR'; pass --version" ;;
    esac
fi

IFS=',' read -r -a STEP_LIST <<< "$STEPS"
for s in "${STEP_LIST[@]}"; do
    case "$s" in create|setup|run|delete) ;; *) die "unknown step '$s' in --steps (create,setup,run,delete)" ;; esac
done
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }
if has_step run; then
    [[ -n "$WORKDIR" ]] || die "--workdir is required for the run step, e.g. --workdir gs://my-bucket/run1"
    [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "give the train arguments after --, e.g. -- --config experiments/pod_gemma3_1b.py:prefinetune"
fi

COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="/tmp/${NAME}-embedder.tar.gz"

step_create() {
    local extra=()
    [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" \
        --accelerator-type "$ACCELERATOR" --version "$VERSION" "${extra[@]}"
}

step_setup() {
    # Ship the working tree (not the local venv or build outputs), then install on every worker.
    run tar -czf "$TARBALL" -C "$REPO_ROOT" --exclude=.venv --exclude=.git --exclude='*.egg-info' \
        --exclude=__pycache__ .
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:/tmp/embedder.tar.gz" "${COMMON[@]}" --worker=all
    local setup="set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/embedder.tar.gz -C ~/$REMOTE_DIR"
    setup+=" && cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
    setup+=" && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
    run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command "$setup"
}

step_run() {
    local quoted
    quoted="$(printf ' %q' "${TRAIN_ARGS[@]}")"
    local cmd="cd ~/$REMOTE_DIR && .venv/bin/python -m embedder.train --distributed --workdir $(printf '%q' "$WORKDIR")$quoted"
    run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command "$cmd"
}

step_delete() {
    run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
}

has_step create && step_create
has_step setup && step_setup
if has_step run; then
    status=0
    step_run || status=$?
    if [[ "$status" != 0 ]]; then
        echo "tpu_vm.sh: the run failed (status $status)" >&2
        has_step delete && step_delete
        exit "$status"
    fi
fi
has_step delete && step_delete
exit 0
