"""How new weights travel from the learner to the rollout workers: config, bucket layout, wire format, transports.

config.py (the `weight_sync:` section), layout.py (buckets), wire.py (the group and its `WireOp` headers),
interface.py (`WeightSender` / `WeightReceiver`), and one file per transport with both of its ends: inprocess.py,
collective.py (gloo / NCCL), shm.py (/dev/shm under a gloo group), cuda_ipc.py (one GPU).
"""
