"""`make gpu-check`: the tests and the short benchmark that need a CUDA GPU (see EXPECTED.md)."""
