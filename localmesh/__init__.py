"""The embedded local mesh: every part of hybridmesh as real processes on loopback."""
