"""Renders a Kubernetes JobSet that trains on GKE TPU slices, and applies it with kubectl.

    python launch/gke_jobset.py --name run1 --topology v5e:4x4 --num-slices 2 \\
        --image us-docker.pkg.dev/PROJ/embedder:latest --workdir gs://BUCKET/run1 \\
        [--dry-run] -- --config experiments/pod_gemma3_1b.py:prefinetune

One replicated Job per slice, one pod per TPU host; the GKE TPU webhook gives each
pod TPU_WORKER_ID / TPU_WORKER_HOSTNAMES and the manifest sets the MEGASCALE_*
variables for multi-slice, from which `jax.distributed.initialize()` (the
`--distributed` flag) finds its peers. The image must hold this package
installed with the `tpu` extra. `--dry-run` prints the manifest and the kubectl
command without running anything; delete a job with `kubectl delete jobset NAME`.

The training writes its workdir with local file APIs, so a `gs://BUCKET[/PATH]`
workdir is mounted into every pod with the GKE Cloud Storage FUSE CSI driver (an
inline ephemeral volume at /gcs/BUCKET, `implicit-dirs`) and the training gets
`--workdir /gcs/BUCKET/PATH`. The cluster needs the GcsFuseCsiDriver add-on and
Workload Identity, and the pods a Kubernetes service account with read/write
access to the bucket (`--service-account KSA`, e.g. roles/storage.objectUser).
The pods run on the host network, which the driver serves through the KSA
(`hostNetworkPodKSA`, a recent GKE version). Any other workdir (e.g. a path on
a PVC your image mounts) is passed unchanged; other URLs are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import subprocess
import sys

import yaml


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    gke_accelerator: str       # node label cloud.google.com/gke-tpu-accelerator
    dims: int                  # 2 (v5e, v6e: AxB) or 3 (v4, v5p: AxBxC)
    single_host_max_chips: int  # slices up to this many chips sit on one host
    chips_per_host: int        # chips per host on multi-host slices


GENERATIONS = {
    "v4": TpuGeneration("tpu-v4-podslice", 3, 4, 4),
    "v5e": TpuGeneration("tpu-v5-lite-podslice", 2, 8, 4),
    "v5p": TpuGeneration("tpu-v5p-slice", 3, 4, 4),
    "v6e": TpuGeneration("tpu-v6e-slice", 2, 8, 4),
}


@dataclasses.dataclass(frozen=True)
class SliceShape:
    generation: str
    topology: str   # e.g. "4x4"
    chips: int
    hosts: int
    chips_per_host: int

    @property
    def gke_accelerator(self) -> str:
        return GENERATIONS[self.generation].gke_accelerator


def parse_topology(name: str) -> SliceShape:
    """`v5e:4x4` -> its chips and hosts per slice (the names `--compile_only --topology` takes)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name)
    if not m:
        raise ValueError(
            f"topology {name!r} is not of the form GENERATION:AxB[xC] with GENERATION in "
            f"{sorted(GENERATIONS)}, e.g. v5e:4x4 or v5p:2x2x4")
    gen, topo = m.group(1), m.group(2)
    spec = GENERATIONS[gen]
    sizes = [int(s) for s in topo.split("x")]
    if len(sizes) != spec.dims or any(s < 1 for s in sizes):
        example = "4x4" if spec.dims == 2 else "2x2x4"
        raise ValueError(f"topology {name!r}: {gen} slices have {spec.dims} positive dimensions, e.g. {gen}:{example}")
    chips = math.prod(sizes)
    per_host = chips if chips <= spec.single_host_max_chips else spec.chips_per_host
    if chips % per_host:
        raise ValueError(f"topology {name!r}: {chips} chips do not fill hosts of {per_host} chips")
    return SliceShape(gen, topo, chips, chips // per_host, per_host)


def _annotation_env(name: str, annotation: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}}


GCS_MOUNT_ROOT = "/gcs"
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BUCKET = re.compile(r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?")


def split_gcs_workdir(workdir: str) -> tuple[str, str] | None:
    """`gs://BUCKET[/PATH]` -> (BUCKET, PATH without outer slashes); None for a plain path.

    Raises ValueError for another URL scheme or a malformed bucket name.
    """
    if workdir.startswith("gs://"):
        bucket, _, path = workdir[len("gs://"):].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"--workdir {workdir!r}: {bucket!r} is not a bucket name (lowercase letters, digits, "
                             "'-', '_', '.'); use --workdir gs://BUCKET/PATH, e.g. gs://my-bucket/run1")
        return bucket, path.strip("/")
    if _URL_SCHEME.match(workdir):
        raise ValueError(f"--workdir {workdir!r}: only gs://BUCKET/PATH (mounted with the Cloud Storage FUSE CSI "
                         "driver) or a path inside the container (e.g. a PVC your image mounts) can be a workdir")
    return None


def render_jobset(*, name: str, topology: str, num_slices: int, image: str, workdir: str,
                  train_args: list[str], max_restarts: int = 0, env: dict[str, str] | None = None,
                  service_account: str | None = None) -> dict:
    """The JobSet manifest as a dict (yaml.safe_dump it for kubectl).

    A gs:// workdir is mounted with the Cloud Storage FUSE CSI driver and the training gets the
    mounted path; `service_account` becomes the pods' serviceAccountName (the KSA the driver
    authenticates as).
    """
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name):
        raise ValueError(f"--name {name!r} must be a DNS label: lowercase letters, digits and '-', at most 40 characters")
    if num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {num_slices}")
    if service_account is not None and not re.fullmatch(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?", service_account):
        raise ValueError(f"--service-account {service_account!r} must be a Kubernetes service account name "
                         "(lowercase letters, digits, '-', '.')")
    shape = parse_topology(topology)
    gcs = split_gcs_workdir(workdir)
    train_workdir = workdir
    if gcs is not None:
        bucket, path = gcs
        mount_path = f"{GCS_MOUNT_ROOT}/{bucket}"
        train_workdir = f"{mount_path}/{path}" if path else mount_path
    command = ["python", "-m", "embedder.train", "--distributed", "--workdir", train_workdir] + list(train_args)
    container_env = [
        _annotation_env("JOBSET_NAME", "jobset.sigs.k8s.io/jobset-name"),
        _annotation_env("REPLICATED_JOB_NAME", "jobset.sigs.k8s.io/replicatedjob-name"),
    ]
    if num_slices > 1:
        # Multi-slice: every host must know the slice count, its slice, and slice 0's first host.
        container_env += [
            {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
            _annotation_env("MEGASCALE_SLICE_ID", "jobset.sigs.k8s.io/job-index"),
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"},
        ]
    for k, v in sorted((env or {}).items()):
        container_env.append({"name": k, "value": str(v)})
    pod_spec = {
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "restartPolicy": "Never",
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": shape.gke_accelerator,
            "cloud.google.com/gke-tpu-topology": shape.topology,
        },
        "containers": [{
            "name": "train",
            "image": image,
            "command": command,
            "env": container_env,
            "ports": [{"containerPort": 8471}, {"containerPort": 8080}, {"containerPort": 8431}],
            "securityContext": {"privileged": True},
            "resources": {"limits": {"google.com/tpu": shape.chips_per_host}},
        }],
    }
    pod_template = {}
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if gcs is not None:
        # The first annotation makes GKE inject the gcsfuse sidecar. gcsfuse stages each written
        # file on local disk before uploading it, so the sidecar's default limits (a few GiB of
        # ephemeral storage) would kill a large checkpoint write: "0" lifts them. The pods use the
        # host network, which the driver authenticates through the pod's KSA only when asked
        # (hostNetworkPodKSA).
        pod_template["metadata"] = {"annotations": {
            "gke-gcsfuse/volumes": "true",
            "gke-gcsfuse/cpu-limit": "0",
            "gke-gcsfuse/memory-limit": "0",
            "gke-gcsfuse/ephemeral-storage-limit": "0",
        }}
        pod_spec["volumes"] = [{
            "name": "gcs-workdir",
            "csi": {
                "driver": "gcsfuse.csi.storage.gke.io",
                "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs",
                                     "hostNetworkPodKSA": "true"},
            },
        }]
        pod_spec["containers"][0]["volumeMounts"] = [{"name": "gcs-workdir", "mountPath": mount_path}]
    pod_template["spec"] = pod_spec
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            # One slice per node pool: JobSet places each replicated job on its own pool.
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": num_slices,
                "template": {"spec": {
                    "parallelism": shape.hosts,
                    "completions": shape.hosts,
                    "completionMode": "Indexed",
                    "backoffLimit": 0,
                    "template": pod_template,
                }},
            }],
        },
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/gke_jobset.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="JobSet name (DNS label)")
    parser.add_argument("--topology", required=True, help="slice topology, e.g. v5e:4x4, v5p:2x2x4, v6e:8x8")
    parser.add_argument("--num-slices", type=int, default=1, help="number of slices (multi-slice over DCN)")
    parser.add_argument("--image", required=True, help="container image with embedder[tpu] installed")
    parser.add_argument("--workdir", required=True,
                        help="run directory: gs://BUCKET/PATH (mounted with Cloud Storage FUSE) or a path in the pod")
    parser.add_argument("--service-account", metavar="KSA",
                        help="Kubernetes service account for the pods (with a gs:// workdir it needs read/write "
                             "access to the bucket through Workload Identity)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="JobSet restarts on failure (training resumes from the last checkpoint)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for every host (repeatable)")
    parser.add_argument("--out", help="also write the manifest to this file")
    parser.add_argument("--dry-run", action="store_true", help="print the manifest and kubectl command only")
    if "--" in argv:
        cut = argv.index("--")
        own, rest = argv[:cut], argv[cut + 1:]
    else:
        own, rest = argv, []
    args = parser.parse_args(own)
    args.train_args = rest
    env = {}
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env {item!r} must be KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    args.env_vars = env
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = render_jobset(name=args.name, topology=args.topology, num_slices=args.num_slices,
                                 image=args.image, workdir=args.workdir, train_args=args.train_args,
                                 max_restarts=args.max_restarts, env=args.env_vars,
                                 service_account=args.service_account)
    except ValueError as e:
        print(f"gke_jobset.py: {e}", file=sys.stderr)
        return 2
    if args.workdir.startswith("gs://") and not args.service_account:
        print("gke_jobset.py: warning: no --service-account: the pods mount the gs:// workdir with the Cloud "
              "Storage FUSE CSI driver and need a Kubernetes service account with storage access to the bucket "
              "(Workload Identity); the namespace's default KSA is used", file=sys.stderr)
    text = yaml.safe_dump(manifest, sort_keys=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    apply = ["kubectl", "apply", "-f", args.out or "-"]
    if args.dry_run:
        sys.stdout.write(text)
        print(f"# would run: {shlex.join(apply)}" + ("" if args.out else "  (manifest on stdin)"))
        return 0
    result = subprocess.run(apply, input=None if args.out else text, text=True)
    if result.returncode == 0:
        print(f"submitted; follow with `kubectl get jobset {args.name}` and "
              f"`kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={args.name}`; "
              f"stop with `kubectl delete jobset {args.name}`")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
