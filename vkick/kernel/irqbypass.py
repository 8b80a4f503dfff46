"""virt/lib/irqbypass.c: the IRQ bypass manager — pairs an interrupt *producer* (a VFIO
device's MSI vector) with a *consumer* (a KVM irqfd) that share a token (the eventfd), so the
consumer can short-cut the producer's interrupt (VT-d posting).

Covered: irq_bypass_register_producer, irq_bypass_unregister_producer,
irq_bypass_register_consumer, irq_bypass_unregister_consumer, __connect, __disconnect.
Differs from the kernel: one registry per run (the kernel's is global), passed as ``rt``.
Walking the consumer list reads each consumer it reaches — up to the one it looks for: one
freed with its irqfd (bug #12) is reported then as a use after free (vkick/kernel/kasan.py).
Differs from the kernel: list_add / list_del's writes to a neighbour's node are not checked.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from vkick.kernel.kasan import kasan_report
from vkick.runtime.tasks import Runtime


@dataclass(slots=True, eq=False)
class IrqBypassProducer:
    """include/linux/irqbypass.h: struct irq_bypass_producer (VFIO: the host ``irq``)."""

    token: Any = None
    irq: int = -1
    add_consumer: Callable[[IrqBypassProducer, IrqBypassConsumer], int] | None = None
    del_consumer: Callable[[IrqBypassProducer, IrqBypassConsumer], None] | None = None
    stop: Callable[[IrqBypassProducer], None] | None = None
    start: Callable[[IrqBypassProducer], None] | None = None


@dataclass(slots=True, eq=False)
class IrqBypassConsumer:
    """include/linux/irqbypass.h: struct irq_bypass_consumer (KVM: ``owner`` is the irqfd,
    container_of in the kernel; ``kasan_freed``: freed with it, vkick/kernel/kasan.py)."""

    token: Any = None
    add_producer: Callable[[IrqBypassConsumer, IrqBypassProducer], int] | None = None
    del_producer: Callable[[IrqBypassConsumer, IrqBypassProducer], None] | None = None
    stop: Callable[[IrqBypassConsumer], None] | None = None
    start: Callable[[IrqBypassConsumer], None] | None = None
    owner: Any = None
    kasan_freed: bool = False


@dataclass(slots=True)
class _Registry:
    producers: list[IrqBypassProducer] = field(default_factory=list)
    consumers: list[IrqBypassConsumer] = field(default_factory=list)


_registries: WeakKeyDictionary[Runtime, _Registry] = WeakKeyDictionary()


def _registry(rt: Runtime) -> _Registry:
    reg = _registries.get(rt)
    if reg is None:
        reg = _registries[rt] = _Registry()
    return reg


def _consumers(rt: Runtime, reg: _Registry, where: str) -> Iterator[IrqBypassConsumer]:
    """``list_for_each_entry(consumer, &consumers, node)``: the walk reads each entry as it
    reaches it (a freed one is reported then); entries after the caller's ``break`` are
    never read."""
    for consumer in reg.consumers:
        if consumer.kasan_freed:
            kasan_report(rt, f"irq_bypass_consumer {getattr(consumer.token, 'name', '?')}",
                         where)
        yield consumer


def __connect(prod: IrqBypassProducer, cons: IrqBypassConsumer) -> int:
    """virt/lib/irqbypass.c: __connect  [process, under the manager's mutex]

    Stop both, let the producer then the consumer take the other (undoing the producer's
    side if the consumer fails), start both again.
    """
    if prod.stop is not None:
        prod.stop(prod)
    if cons.stop is not None:
        cons.stop(cons)
    ret = 0
    if prod.add_consumer is not None:
        ret = prod.add_consumer(prod, cons)
    if not ret:
        assert cons.add_producer is not None
        ret = cons.add_producer(cons, prod)
        if ret and prod.del_consumer is not None:
            prod.del_consumer(prod, cons)
    if cons.start is not None:
        cons.start(cons)
    if prod.start is not None:
        prod.start(prod)
    return ret


def __disconnect(prod: IrqBypassProducer, cons: IrqBypassConsumer) -> None:
    """virt/lib/irqbypass.c: __disconnect  [process, under the manager's mutex]"""
    if prod.stop is not None:
        prod.stop(prod)
    if cons.stop is not None:
        cons.stop(cons)
    assert cons.del_producer is not None
    cons.del_producer(cons, prod)
    if prod.del_consumer is not None:
        prod.del_consumer(prod, cons)
    if cons.start is not None:
        cons.start(cons)
    if prod.start is not None:
        prod.start(prod)


def irq_bypass_register_producer(rt: Runtime, producer: IrqBypassProducer) -> int:
    """virt/lib/irqbypass.c: irq_bypass_register_producer  [process]

    -EINVAL without a token, -EBUSY if a producer has it already; connects to the consumer
    with the same token, if one is registered.
    """
    if producer.token is None:
        return -errno.EINVAL
    reg = _registry(rt)
    if any(p.token is producer.token for p in reg.producers):
        return -errno.EBUSY
    for consumer in _consumers(rt, reg, "irq_bypass_register_producer"):
        if consumer.token is producer.token:
            ret = __connect(producer, consumer)
            if ret:
                return ret
            break
    reg.producers.insert(0, producer)  # list_add
    return 0


def irq_bypass_unregister_producer(rt: Runtime, producer: IrqBypassProducer) -> None:
    """virt/lib/irqbypass.c: irq_bypass_unregister_producer  [process]"""
    if producer.token is None:
        return
    reg = _registry(rt)
    if producer not in reg.producers:
        return
    for consumer in _consumers(rt, reg, "irq_bypass_unregister_producer"):
        if consumer.token is producer.token:
            __disconnect(producer, consumer)
            break
    reg.producers.remove(producer)


def irq_bypass_register_consumer(rt: Runtime, consumer: IrqBypassConsumer) -> int:
    """virt/lib/irqbypass.c: irq_bypass_register_consumer  [process]

    -EINVAL without a token or callbacks, -EBUSY for a duplicate; connects to the producer
    with the same token, if one is registered.
    """
    if consumer.token is None or consumer.add_producer is None or consumer.del_producer is None:
        return -errno.EINVAL
    reg = _registry(rt)
    if any(c.token is consumer.token or c is consumer
           for c in _consumers(rt, reg, "irq_bypass_register_consumer")):
        return -errno.EBUSY
    for producer in reg.producers:
        if producer.token is consumer.token:
            ret = __connect(producer, consumer)
            if ret:
                return ret
            break
    reg.consumers.insert(0, consumer)  # list_add
    return 0


def irq_bypass_unregister_consumer(rt: Runtime, consumer: IrqBypassConsumer) -> None:
    """virt/lib/irqbypass.c: irq_bypass_unregister_consumer  [process]"""
    if consumer.token is None:
        return
    reg = _registry(rt)
    if consumer not in _consumers(rt, reg, "irq_bypass_unregister_consumer"):
        return
    for producer in reg.producers:
        if producer.token is consumer.token:
            __disconnect(producer, consumer)
            break
    reg.consumers.remove(consumer)
