"""`stdrc serve`: the bundle behind a versioned HTTP job API on Ray Serve (docs/serving.md).

Importing this package or `stdrc.serve.cli` needs no Ray: the subcommands import it only when run.
The job API's client is `stdrc.runtime.client` (requests only), shared with `stdrc app --server`.
"""
