"""The scheduler: polls the PACS export bucket and enqueues complete studies. Never imports TensorFlow."""
