"""Host-side data: dataset builders (medjax.data.datasets), I/O, preprocessing, splits and the input pipeline.

Everything under medjax.data uses numpy only (no jax): it runs on the host, and the pipeline hands batches
to the device. Importing this package registers nothing by itself; import medjax.data.datasets for the
DATASETS registry.
"""
