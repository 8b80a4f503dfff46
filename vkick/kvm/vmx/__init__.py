"""arch/x86/kvm/vmx/: posted interrupts and the VMX pieces of the interrupt path."""
