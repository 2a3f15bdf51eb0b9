"""The application shell: the `ti2i` command line and the demo, above every library layer."""
