"""CPU kernels written in C, built on first use by the machine's C compiler (torch is the fallback)."""
