"""Run: one verification (verify), its trial flow (trial), where the QEMUs run (sites, hosts,
remote_qemu, remote_agent), the QEMU processes (qemu), the migration policy (migration), the guest's
load (workload) and negative controls (inject)."""
