"""Kernel primitives the path is built from: tasks and sleeping, wait queues, eventfd,
workqueues, bit operations, seqcount and SRCU (kernel/sched/, fs/eventfd.c, kernel/workqueue.c).

These modules mirror kernel code and keep its names; they are internals with no stability
promise (the public API is :mod:`vkick`).
"""
