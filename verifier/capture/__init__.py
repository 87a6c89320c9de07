"""Capture: guest RAM on both sides (ram: backing file, pmemsave; savedirtylog: QEMU's own
-savedirtylog) and every vCPU's registers through the gdbstubs (cpustate)."""
