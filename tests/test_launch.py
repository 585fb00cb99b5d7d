"""Launch scripts: dry runs print the exact commands / manifests; the local launcher really runs processes."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
PY = sys.executable


def _run(cmd, env=None, timeout=60):
    full_env = dict(os.environ)
    for k in [k for k in full_env if k.startswith("SLURM_")]:
        del full_env[k]
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


# -- launch/local.py ---------------------------------------------------------------


def test_local_dry_run_sets_coordinator_ids_and_device_count():
    r = _run([PY, "launch/local.py", "--processes", "3", "--devices-per-process", "2", "--port", "4321",
              "--dry-run", "--", "--config", "experiments/demo.py", "--workdir", "/tmp/w"],
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words[:5])
        assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
        assert env["JAX_NUM_PROCESSES"] == "3" and env["JAX_PROCESS_ID"] == str(i)
        assert env["JAX_PLATFORMS"] == "cpu"
        # The inherited device count is replaced, other XLA flags are kept.
        assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/d", "--xla_force_host_platform_device_count=2"]
        assert words[5:] == [PY, "-m", "embedder.train", "--distributed", "--config", "experiments/demo.py",
                             "--workdir", "/tmp/w"]


def test_local_rejects_bad_counts():
    r = _run([PY, "launch/local.py", "--processes", "0", "--", "--config", "x"])
    assert r.returncode == 2 and "--processes must be >= 1" in r.stderr


def test_local_runs_processes_with_prefixed_output():
    script = ("import os; print('hello from', os.environ['JAX_PROCESS_ID'], 'of', os.environ['JAX_NUM_PROCESSES'],"
              " os.environ['XLA_FLAGS'])")
    # The test process's own XLA_FLAGS (e.g. what `import embedder` appended) would be inherited.
    r = _run([PY, "launch/local.py", "--processes", "2", "--devices-per-process", "3", "--command", "--",
              PY, "-c", script], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = sorted(line for line in r.stdout.splitlines() if "hello" in line)
    assert lines == [f"[p{i}] hello from {i} of 2 --xla_force_host_platform_device_count=3" for i in range(2)]


def test_local_failure_stops_the_others_and_returns_its_status(tmp_path):
    # Process 1 fails at once; process 0 would sleep for a minute unless it is stopped.
    marker = tmp_path / "survived"
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1':\n"
              "    print('failing'); sys.exit(3)\n"
              f"time.sleep(60); open({str(marker)!r}, 'w').write('x')\n")
    t0 = time.time()
    r = _run([PY, "launch/local.py", "--processes", "2", "--grace", "2", "--command", "--", PY, "-c", script])
    assert r.returncode == 3, r.stdout + r.stderr
    assert time.time() - t0 < 30
    assert "[p1] failing" in r.stdout
    assert "process 1 exited with status 3; stopping the others" in r.stdout
    assert not marker.exists()


# -- launch/tpu_vm.sh --------------------------------------------------------------


def test_tpu_vm_dry_run_prints_the_gcloud_lifecycle():
    r = _run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "emb", "--zone", "us-west4-a",
              "--project", "proj", "--accelerator", "v5litepod-16", "--workdir", "gs://bucket/run1", "--spot",
              "--", "--config", "experiments/pod_gemma3_1b.py:prefinetune", "--config.total_steps=10"])
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines()]
    assert [c[:4] for c in cmds] == [
        ["gcloud", "compute", "tpus", "tpu-vm"], ["tar", "-czf", "/tmp/emb-embedder.tar.gz", "-C"],
        ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "tpu-vm"],
        ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "tpu-vm"]]
    create, _, scp, setup, run, delete = cmds
    assert create[4:] == ["create", "emb", "--zone", "us-west4-a", "--project", "proj", "--accelerator-type",
                          "v5litepod-16", "--version", "v2-alpha-tpuv5-lite", "--spot"]
    assert scp[4] == "scp" and "--worker=all" in scp
    assert setup[4] == "ssh" and "--worker=all" in setup
    assert "pip install -q -c constraints.txt -e '.[tpu]'" in setup[setup.index("--command") + 1]
    assert run[4] == "ssh" and "--worker=all" in run
    # The gs:// workdir becomes the bucket's gcsfuse mount (details in the tests below).
    remote = shlex.split(run[run.index("--command") + 1].rsplit(" && ", 1)[1])
    assert remote == [".venv/bin/python", "-m", "embedder.train", "--distributed", "--workdir", "~/gcs/bucket/run1",
                      "--config", "experiments/pod_gemma3_1b.py:prefinetune", "--config.total_steps=10"]
    assert delete[4:6] == ["delete", "emb"] and "--quiet" in delete


def _tpu_vm_remote_commands(workdir, steps="setup,run"):
    """The --command strings of the setup and run ssh calls of a dry run."""
    r = _run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "emb", "--zone", "z", "--accelerator",
              "v5litepod-16", "--workdir", workdir, "--steps", steps, "--", "--config", "c.py"])
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines()]
    ssh = [c[c.index("--command") + 1] for c in cmds if c[4] == "ssh"]
    assert len(ssh) == len(steps.split(",")) and all("--worker=all" in c for c in cmds if c[4] == "ssh")
    return ssh


def _stub(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def test_tpu_vm_gs_workdir_installs_gcsfuse_then_mounts_before_training():
    setup, run = _tpu_vm_remote_commands("gs://my-bucket/runs/r1/")
    install, _, rest = setup.partition("; mkdir -p ~/embedder")
    assert rest and "pip install -q -c constraints.txt" in rest
    assert install.startswith("set -e; command -v gcsfuse >/dev/null 2>&1 || {")
    assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" in install
    assert install.rstrip("; ").endswith("install -y -qq gcsfuse; }")
    mount, _, train = run.rpartition(" && ")
    assert "mountpoint -q ~/gcs/my-bucket &&" in mount
    assert "gcsfuse --implicit-dirs my-bucket ~/gcs/my-bucket;" in mount
    # PATH kept (outer slashes dropped), under the mount root; the tilde stays bare for the worker's shell.
    assert shlex.split(train) == [".venv/bin/python", "-m", "embedder.train", "--distributed", "--workdir",
                                  "~/gcs/my-bucket/runs/r1", "--config", "c.py"]
    # A bucket without a path trains in the mount root itself.
    (run,) = _tpu_vm_remote_commands("gs://my-bucket", steps="run")
    assert shlex.split(run.rpartition(" && ")[2])[5] == "~/gcs/my-bucket"


def test_tpu_vm_remote_snippets_really_mount_once_and_install_only_when_missing(tmp_path):
    # Run the exact remote commands in bash with stand-ins for gcsfuse, mountpoint, sudo, apt's tools.
    setup, run = _tpu_vm_remote_commands("gs://my-bucket/runs/r1")
    home, bin_dir, log = tmp_path / "home", tmp_path / "bin", tmp_path / "log"
    (home / "embedder" / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    _stub(home / "embedder" / ".venv" / "bin", "python", f'echo "python $*" >> {log}')
    _stub(bin_dir, "gcsfuse", f'echo "gcsfuse $*" >> {log}; touch "$3/.mounted"')
    _stub(bin_dir, "mountpoint", '[ -e "$2/.mounted" ]')
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    for _ in range(2):
        r = _run(["bash", "-c", run], env=env)
        assert r.returncode == 0, r.stderr
    mnt = home / "gcs" / "my-bucket"
    assert log.read_text().splitlines() == [
        f"gcsfuse --implicit-dirs my-bucket {mnt}",                 # mounted once: the second run finds it
        f"python -m embedder.train --distributed --workdir {mnt}/runs/r1 --config c.py",
        f"python -m embedder.train --distributed --workdir {mnt}/runs/r1 --config c.py"]

    # A dead mount (listed, but unreadable) is unmounted and mounted again.
    log.unlink()
    _stub(bin_dir, "ls", "exit 2")
    _stub(bin_dir, "fusermount", f'echo "fusermount $*" >> {log}')
    r = _run(["bash", "-c", run], env=env)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines()[:2] == [f"fusermount -uz {mnt}", f"gcsfuse --implicit-dirs my-bucket {mnt}"]
    (bin_dir / "ls").unlink()

    # Without gcsfuse the run says so and never starts the training.
    (bin_dir / "gcsfuse").unlink()
    (mnt / ".mounted").unlink()
    log.unlink()
    r = _run(["bash", "-c", run], env=env)
    assert r.returncode == 1 and "gcsfuse is not installed on" in r.stderr and not log.exists()

    # The install snippet adds the apt repo of the worker's release and installs gcsfuse ...
    install = setup.partition("; mkdir -p ~/embedder")[0]
    _stub(bin_dir, "lsb_release", "echo jammy")
    _stub(bin_dir, "curl", f'echo "curl $*" >> {log}; echo KEY')
    _stub(bin_dir, "sudo", f'echo "sudo $*" >> {log}; if [ "$1" = tee ]; then cat >> {log}; fi')
    r = _run(["bash", "-c", install], env=env)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls[:2] == ["sudo tee /etc/apt/sources.list.d/gcsfuse.list",
                         "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
                         "https://packages.cloud.google.com/apt gcsfuse-jammy main"]
    assert calls[-1].startswith("sudo DEBIAN_FRONTEND=noninteractive apt-get") and calls[-1].endswith(
        "install -y -qq gcsfuse")
    # ... and does nothing where gcsfuse is already installed.
    log.unlink()
    _stub(bin_dir, "gcsfuse", "exit 0")
    r = _run(["bash", "-c", install], env=env)
    assert r.returncode == 0 and not log.exists()


def test_tpu_vm_local_workdir_is_passed_unchanged_without_gcsfuse():
    setup, run = _tpu_vm_remote_commands("/mnt/filestore/run 1")
    assert "gcsfuse" not in setup and "gcsfuse" not in run and "mountpoint" not in run
    assert run.startswith("cd ~/embedder && ")
    assert shlex.split(run.rpartition(" && ")[2])[4:6] == ["--workdir", "/mnt/filestore/run 1"]


@pytest.mark.parametrize("workdir,message", [
    ("s3://bucket/run1", "only gs://BUCKET/PATH"),
    ("http://host/run1", "only gs://BUCKET/PATH"),
    ("gs:///run1", "'' is not a bucket name"),
    ("gs://My_Bucket;rm/run1", "is not a bucket name"),
])
def test_tpu_vm_rejects_other_urls(workdir, message):
    r = _run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "emb", "--zone", "z", "--accelerator", "v5p-32",
              "--workdir", workdir, "--", "--config", "c.py"])
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_tpu_vm_help_documents_gcs_workdirs():
    r = _run(["bash", "launch/tpu_vm.sh", "--help"])
    assert r.returncode == 0
    assert "gcsfuse --implicit-dirs" in r.stdout and "~/gcs/BUCKET/PATH" in r.stdout
    assert "set -euo pipefail" not in r.stdout          # the header only


def test_tpu_vm_steps_subset_and_errors():
    r = _run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "emb", "--zone", "z", "--accelerator", "v6e-64",
              "--steps", "create"])
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "v2-alpha-tpuv6e" in r.stdout
    r = _run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "emb", "--zone", "z", "--accelerator", "v5p-32",
              "--", "--config", "c.py"])
    assert r.returncode == 2 and "--workdir is required" in r.stderr
    r = _run(["bash", "launch/tpu_vm.sh", "--dry-run", "--zone", "z", "--accelerator", "v5p-32"])
    assert r.returncode == 2 and "--name is required" in r.stderr
    r = _run(["bash", "launch/tpu_vm.sh", "--bogus"])
    assert r.returncode == 2 and "unknown option '--bogus'" in r.stderr


# -- launch/gke_jobset.py ----------------------------------------------------------


def test_gke_jobset_dry_run_renders_a_multislice_manifest():
    r = _run([PY, "launch/gke_jobset.py", "--name", "run1", "--topology", "v5e:4x4", "--num-slices", "2",
              "--image", "img:1", "--workdir", "gs://b/run1", "--env", "FOO=bar", "--dry-run", "--",
              "--config", "experiments/pod_gemma3_1b.py:prefinetune"])
    assert r.returncode == 0, r.stderr
    body, _, tail = r.stdout.rpartition("# would run: ")
    assert tail.startswith("kubectl apply -f -")
    m = yaml.safe_load(body)
    assert m["kind"] == "JobSet" and m["metadata"]["name"] == "run1"
    job = m["spec"]["replicatedJobs"][0]
    assert job["replicas"] == 2                                  # one Job per slice
    assert job["template"]["spec"]["parallelism"] == 4            # 16 chips / 4 per host
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4"}
    c = pod["containers"][0]
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    assert c["command"] == ["python", "-m", "embedder.train", "--distributed", "--workdir", "/gcs/b/run1",
                            "--config", "experiments/pod_gemma3_1b.py:prefinetune"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["FOO"] == "bar"
    assert "MEGASCALE_SLICE_ID" in env and "MEGASCALE_COORDINATOR_ADDRESS" in env


def _gke_manifest(workdir, *extra):
    r = _run([PY, "launch/gke_jobset.py", "--name", "r", "--topology", "v5e:4x4", "--image", "i",
              "--workdir", workdir, *extra, "--dry-run", "--", "--config", "c.py"])
    assert r.returncode == 0, r.stderr
    body = r.stdout.rpartition("# would run: ")[0]
    template = yaml.safe_load(body)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    return template, r.stderr


def test_gke_jobset_gs_workdir_mounts_the_bucket_with_the_csi_driver():
    template, stderr = _gke_manifest("gs://my-bucket/runs/r1/", "--service-account", "trainer")
    assert stderr == ""
    annotations = template["metadata"]["annotations"]
    assert annotations["gke-gcsfuse/volumes"] == "true"
    assert annotations["gke-gcsfuse/ephemeral-storage-limit"] == "0"
    pod = template["spec"]
    assert pod["serviceAccountName"] == "trainer"
    (volume,) = pod["volumes"]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "my-bucket"
    assert volume["csi"]["volumeAttributes"]["mountOptions"] == "implicit-dirs"
    assert volume["csi"]["volumeAttributes"]["hostNetworkPodKSA"] == "true"   # the pods use the host network
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/gcs/my-bucket"}]
    command = container["command"]
    assert command[command.index("--workdir") + 1] == "/gcs/my-bucket/runs/r1"


def test_gke_jobset_gs_workdir_without_service_account_warns():
    template, stderr = _gke_manifest("gs://my-bucket")
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "service account" in lines[0]
    assert "serviceAccountName" not in template["spec"]
    command = template["spec"]["containers"][0]["command"]
    assert command[command.index("--workdir") + 1] == "/gcs/my-bucket"


def test_gke_jobset_local_workdir_is_unchanged():
    template, stderr = _gke_manifest("/data/runs/r1")
    assert stderr == ""
    assert "metadata" not in template and "volumes" not in template["spec"]
    assert "serviceAccountName" not in template["spec"]
    (container,) = template["spec"]["containers"]
    assert "volumeMounts" not in container
    assert container["command"][container["command"].index("--workdir") + 1] == "/data/runs/r1"
    template, _ = _gke_manifest("/data/runs/r1", "--service-account", "trainer")
    assert template["spec"]["serviceAccountName"] == "trainer" and "volumes" not in template["spec"]
    r = _run([PY, "launch/gke_jobset.py", "--name", "r", "--topology", "v5e:4x4", "--image", "i",
              "--workdir", "gs://b/r", "--service-account", "Trainer_SA", "--dry-run"])
    assert r.returncode == 2 and "--service-account 'Trainer_SA' must be a Kubernetes service account" in r.stderr


@pytest.mark.parametrize("workdir,message", [
    ("s3://bucket/run1", "only gs://BUCKET/PATH"),
    ("gs://Bad Bucket/run1", "is not a bucket name"),
])
def test_gke_jobset_rejects_other_urls(workdir, message):
    r = _run([PY, "launch/gke_jobset.py", "--name", "r", "--topology", "v5e:4x4", "--image", "i",
              "--workdir", workdir, "--dry-run"])
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


@pytest.mark.parametrize("topology,hosts,per_host,label", [
    ("v5e:2x4", 1, 8, "tpu-v5-lite-podslice"),   # 8 chips fit one v5e host
    ("v6e:8x8", 16, 4, "tpu-v6e-slice"),
    ("v5p:2x2x4", 4, 4, "tpu-v5p-slice"),
    ("v4:2x2x1", 1, 4, "tpu-v4-podslice"),
])
def test_gke_jobset_hosts_per_slice(topology, hosts, per_host, label, tmp_path):
    out = tmp_path / "js.yaml"
    r = _run([PY, "launch/gke_jobset.py", "--name", "r", "--topology", topology, "--image", "i",
              "--workdir", "gs://b/r", "--out", str(out), "--dry-run", "--", "--config", "c.py"])
    assert r.returncode == 0, r.stderr
    assert f"# would run: kubectl apply -f {out}" in r.stdout
    m = yaml.safe_load(out.read_text())
    spec = m["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = spec["template"]["spec"]
    assert spec["completions"] == hosts
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == per_host
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == label
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "MEGASCALE_NUM_SLICES" not in env                      # single slice


@pytest.mark.parametrize("topology,message", [
    ("v5litepod-16", "is not of the form"),
    ("v5e:4x4x2", "v5e slices have 2 positive dimensions"),
    ("v5p:4x4", "v5p slices have 3 positive dimensions"),
])
def test_gke_jobset_bad_topology(topology, message):
    r = _run([PY, "launch/gke_jobset.py", "--name", "r", "--topology", topology, "--image", "i",
              "--workdir", "w", "--dry-run"])
    assert r.returncode == 2 and message in r.stderr


# -- launch/slurm_gpu.sbatch --------------------------------------------------------


def test_slurm_dry_run_outside_allocation_submits_itself():
    r = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--",
              "--config", "experiments/demo.py", "--workdir", "/shared/r"])
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout.strip()[2:])
    assert words == ["sbatch", "--nodes", "4", "--gpus-per-node", "8", "--chdir", str(ROOT),
                     str(ROOT / "launch/slurm_gpu.sbatch"), "--nodes", "4", "--gpus-per-node", "8", "--",
                     "--config", "experiments/demo.py", "--workdir", "/shared/r"]


def test_slurm_dry_run_inside_allocation_one_process_per_gpu():
    r = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--", "--config", "experiments/demo.py",
              "--workdir", "/shared/r"],
             env={"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "4"})
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout.strip()[2:])
    assert words[:6] == ["srun", "--nodes", "3", "--ntasks-per-node", "4", "--kill-on-bad-exit=1"]
    assert words[words.index("python"):] == ["python", "-m", "embedder.train", "--distributed", "--config",
                                             "experiments/demo.py", "--workdir", "/shared/r"]
    assert not any(w.startswith("JAX_LOCAL_DEVICE_IDS=") for w in words)


def test_slurm_dry_run_one_process_per_node_sees_all_gpus():
    r = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--per-node", "--gpus-per-node", "4", "--venv",
              "/opt/venv", "--", "--config", "c.py"], env={"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"})
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout.strip()[2:])
    assert words[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "1"]
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in words
    assert words[words.index("/opt/venv/bin/python"):] == ["/opt/venv/bin/python", "-m", "embedder.train",
                                                          "--distributed", "--config", "c.py"]


def test_slurm_errors():
    r = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run"])
    assert r.returncode == 2 and "give the train arguments after --" in r.stderr
    r = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--nodes", "zero", "--", "--config", "c"])
    assert r.returncode == 2 and "--nodes must be a positive integer" in r.stderr


# -- python -m embedder.train --workdir URL -----------------------------------------


def test_train_cli_refuses_a_url_workdir_before_starting(tmp_path):
    t0 = time.time()
    r = subprocess.run([PY, "-m", "embedder.train", "--config", f"{ROOT}/experiments/demo.py:prefinetune",
                        "--workdir", "gs://b/run"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.time() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "'gs://b/run' is a URL" in lines[0] and "gcsfuse --implicit-dirs BUCKET /mnt/BUCKET" in lines[0]
    assert "launch/tpu_vm.sh and launch/gke_jobset.py" in lines[0]
    assert list(tmp_path.iterdir()) == []           # no "gs:" directory left behind
    assert elapsed < 20, elapsed                    # fails before JAX starts (a real start takes longer)
