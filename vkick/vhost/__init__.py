"""vhost: drivers/vhost/{vhost,net}.c and the split ring of include/uapi/linux/virtio_ring.h.

So far: the ring layout and the device side's notification logic (used ring publishing,
event-idx suppression, notify enable/disable).  The worker, vhost-net handlers and the
guest driver follow (issue "vhost-net and the guest virtio driver").
"""
