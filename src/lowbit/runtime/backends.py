"""The runtime backends `lowbit.load` accepts, named without importing torch (the CLI lists them in its options).
What each does: `lowbit.api.load`."""

BACKENDS = ("exact", "fast", "dequantized")
