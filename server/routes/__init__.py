"""HTTP routers, one module per resource: generation, jobs, operations."""
