"""Hardware: physical CPUs with IPI inboxes, and VMX non-root execution with APICv (posted-
interrupt processing, virtual-interrupt delivery, TPR/EOI virtualization) per the Intel SDM."""
