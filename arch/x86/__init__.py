"""x86-64: MSR indices, control-register and flag bits, the PC's fixed addresses and ports."""
