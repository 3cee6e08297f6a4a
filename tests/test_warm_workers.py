"""Local workers forked from the command's fork server: what a spawned worker would have, they have.

The fork server is one per process and keeps the environment it started with, so
each check runs in an interpreter of its own, as the `facecap` command does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, os
    from facecap.flows import warm_workers

    if __name__ == "__main__":
        warm_workers.start()
        from distributed import Client
        from facecap.config import load_config
        from facecap.flows.executor import _local_cluster_kwargs, local_cluster

        kwargs = {**_local_cluster_kwargs(load_config(None, [], "offline")), "n_workers": 1}
        os.environ["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # chosen after the server started
        with local_cluster(**kwargs) as cluster, Client(cluster) as client:
            def view():
                import sys
                from prefect.settings import get_current_settings
                return {"parent": os.getppid(), "omp": os.environ.get("OMP_NUM_THREADS"),
                        "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                        "api": get_current_settings().api.url, "stages": "facecap.tasks.stages" in sys.modules}
            seen = list(client.run(view).values())
        server = warm_workers.multiprocessing.forkserver._forkserver._forkserver_pid
        with open(f"/proc/{server}/environ", "rb") as fh:  # what the server imported numpy and onnxruntime with
            environ = dict(v.decode().split("=", 1) for v in fh.read().split(b"\\0") if b"=" in v)
        warm_workers.stop()
        print(json.dumps({"server": server, "server_omp": environ.get("OMP_NUM_THREADS"), "workers": seen}))
""")


def test_forked_workers_get_the_nanny_environment_and_the_runs_prefect_api(tmp_path):
    script = tmp_path / "fork.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    [worker] = result["workers"]
    assert worker["parent"] == result["server"], "the worker was forked from the warm server"
    assert worker["omp"] == "1" and worker["malloc_trim"] is None, "Dask's nanny environment, less the malloc trim"
    assert worker["api"] == "http://127.0.0.1:9/api" and worker["stages"]
    # Thread pools sized at import (OpenBLAS) follow the server's environment, not the worker's.
    assert result["server_omp"] == "1"
