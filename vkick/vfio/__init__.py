"""VFIO: assigning a host PCI device to a VM (drivers/vfio)."""
