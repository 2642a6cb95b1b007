"""Thin adapters over `packer`: input sources, the Beam pipeline, the tf.data stream, tf.data service, the CLI.

Heavy frameworks (tensorflow, apache_beam, pyarrow) are imported lazily, inside the functions that need them.
"""
