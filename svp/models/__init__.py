"""The VLM layer shared by the sampler and the scorer: loading, prompting, tiny test models, engines."""
