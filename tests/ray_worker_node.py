"""A second Ray node on this machine, on 127.0.0.1 only: `python ray_worker_node.py GCS_ADDRESS CPUS`.

On Linux `ray start --address` refuses to join a cluster as a second node on 127.0.0.1 (and
Ray swaps 127.0.0.1 for the machine's network address, so its servers would listen beyond
loopback). This starts the node with Ray's own node launcher, the one `ray start` and
`ray.cluster_utils.Cluster` use: its own raylet, object store and workers, joined to the
head's GCS. It prints `node <id>` once up, and SIGTERM stops the node's processes.
"""

import signal
import sys
import time

import ray._private.node
import ray._private.parameter


def main() -> None:
    gcs_address, cpus = sys.argv[1], int(sys.argv[2])
    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address,
        node_ip_address="127.0.0.1",
        num_cpus=cpus,
        num_gpus=0,
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
        include_log_monitor=False,
        dashboard_agent_listen_port=None,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("node", node.node_id, flush=True)
    try:
        while True:
            time.sleep(1)
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)


if __name__ == "__main__":
    main()
