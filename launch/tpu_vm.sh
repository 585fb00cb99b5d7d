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
#           pinned constraints (--worker=all); with a gs:// workdir also install gcsfuse
#           (Google's apt repo, skipped where `gcsfuse` is already on PATH).
#   run     `python -m embedder.train --distributed --workdir WORKDIR <args>` on all workers at
#           once; jax.distributed finds its peers from the TPU metadata by itself.
#   delete  tear the VM down (also runs on failure of `run` when `delete` was asked for).
# --dry-run prints every command instead of running it.
#
# The workdir must be one place that every host writes its checkpoint shards to and that
# outlives the VM. The training writes it with local file APIs, so:
#   gs://BUCKET[/PATH]  the run step first mounts the bucket on every worker with Cloud
#           Storage FUSE at ~/gcs/BUCKET (`gcsfuse --implicit-dirs`, skipped where it is
#           already mounted and readable) and trains with --workdir ~/gcs/BUCKET/PATH. The
#           VM's service account needs read/write access to the bucket (e.g.
#           roles/storage.objectUser).
#   /PATH   any other path (e.g. a Filestore / NFS mount present on every worker) is passed
#           unchanged. Other URLs (s3://, http://, ...) are refused.
set -euo pipefail

# The header comment above, up to the first line that is not a comment.
usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

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

# A gs:// workdir becomes a gcsfuse mount on every worker (see the header); other URLs are refused.
GCS_MOUNT_ROOT='~/gcs'   # expanded by the remote shell, so it is the worker user's home
GCS_BUCKET=""
GCS_PATH=""
URL_RE='^[A-Za-z][A-Za-z0-9+.-]*://'
BUCKET_RE='^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$'
if [[ "$WORKDIR" == gs://* ]]; then
    rest="${WORKDIR#gs://}"
    GCS_BUCKET="${rest%%/*}"
    [[ "$rest" == */* ]] && GCS_PATH="${rest#*/}"
    while [[ "$GCS_PATH" == /* ]]; do GCS_PATH="${GCS_PATH#/}"; done
    while [[ "$GCS_PATH" == */ ]]; do GCS_PATH="${GCS_PATH%/}"; done
    [[ "$GCS_BUCKET" =~ $BUCKET_RE ]] || die "--workdir '$WORKDIR': '$GCS_BUCKET' is not a bucket name" \
        "(lowercase letters, digits, '-', '_', '.'); use --workdir gs://BUCKET/PATH, e.g. gs://my-bucket/run1"
elif [[ "$WORKDIR" =~ $URL_RE ]]; then
    die "--workdir '$WORKDIR': only gs://BUCKET/PATH (mounted with gcsfuse on every worker) or a path" \
        "that every worker shares (e.g. a Filestore/NFS mount) can be a workdir"
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

# Idempotent: installs gcsfuse from Google's apt repo only where it is missing. The lock timeout
# waits for the unattended upgrades a freshly booted VM runs instead of failing on apt's lock.
GCSFUSE_INSTALL='command -v gcsfuse >/dev/null 2>&1 || { echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]'
GCSFUSE_INSTALL+=' https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main"'
GCSFUSE_INSTALL+=' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null'
GCSFUSE_INSTALL+=' && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg'
GCSFUSE_INSTALL+=' | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null'
GCSFUSE_INSTALL+=' && sudo apt-get -o DPkg::Lock::Timeout=600 update -qq'
GCSFUSE_INSTALL+=' && sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; }'

step_setup() {
    # Ship the working tree (not the local venv or build outputs), then install on every worker.
    run tar -czf "$TARBALL" -C "$REPO_ROOT" --exclude=.venv --exclude=.git --exclude='*.egg-info' \
        --exclude=__pycache__ .
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:/tmp/embedder.tar.gz" "${COMMON[@]}" --worker=all
    local setup="set -e; "
    [[ -n "$GCS_BUCKET" ]] && setup+="$GCSFUSE_INSTALL; "
    setup+="mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/embedder.tar.gz -C ~/$REMOTE_DIR"
    setup+=" && cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
    setup+=" && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
    run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command "$setup"
}

step_run() {
    local quoted workdir mount=""
    quoted="$(printf ' %q' "${TRAIN_ARGS[@]}")"
    workdir="$(printf '%q' "$WORKDIR")"
    if [[ -n "$GCS_BUCKET" ]]; then
        # The bucket name is validated above, so it needs no quoting; the tilde must stay bare.
        # A mount whose gcsfuse died is still listed but unreadable ("Transport endpoint is not
        # connected"): lazily unmount it and mount again instead of training into it.
        local mnt="$GCS_MOUNT_ROOT/$GCS_BUCKET"
        mount="if ! { mountpoint -q $mnt && ls $mnt >/dev/null 2>&1; }; then command -v gcsfuse >/dev/null"
        mount+=" || { echo \"gcsfuse is not installed on \$(hostname); run the setup step with this gs://"
        mount+=" --workdir\" >&2; exit 1; }; fusermount -uz $mnt 2>/dev/null || fusermount3 -uz $mnt"
        mount+=" 2>/dev/null || true; mkdir -p $mnt && gcsfuse --implicit-dirs $GCS_BUCKET $mnt; fi && "
        workdir="$mnt"
        [[ -n "$GCS_PATH" ]] && workdir+="/$(printf '%q' "$GCS_PATH")"
    fi
    local cmd="${mount}cd ~/$REMOTE_DIR && .venv/bin/python -m embedder.train --distributed --workdir $workdir$quoted"
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
