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
    r = _run([PY, "launch/local.py", "--processes", "2", "--devices-per-process", "3", "--command", "--",
              PY, "-c", script])
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
    remote = shlex.split(run[run.index("--command") + 1].split("&&", 1)[1])
    assert remote == [".venv/bin/python", "-m", "embedder.train", "--distributed", "--workdir", "gs://bucket/run1",
                      "--config", "experiments/pod_gemma3_1b.py:prefinetune", "--config.total_steps=10"]
    assert delete[4:6] == ["delete", "emb"] and "--quiet" in delete


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
    assert c["command"] == ["python", "-m", "embedder.train", "--distributed", "--workdir", "gs://b/run1",
                            "--config", "experiments/pod_gemma3_1b.py:prefinetune"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["FOO"] == "bar"
    assert "MEGASCALE_SLICE_ID" in env and "MEGASCALE_COORDINATOR_ADDRESS" in env


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
